"""The examples run end to end in smoke mode (tiny sizes, a few steps), each in its own process."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from launch import ROOT, run_script

EXAMPLES = ROOT / "examples"


def _run(script: str, tmp_path: Path, *args: str, timeout: int = 240) -> str:
    run = run_script(EXAMPLES / script, "--smoke", "--log-dir", str(tmp_path / "logs"), *args, out=tmp_path,
                     ranks=0, env={"PYTHONUNBUFFERED": "1"}, timeout=timeout)
    return run.output


def _import_example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_language_model_defaults_are_the_showcase():
    lm = _import_example("language_model")
    common = _import_example("_common")
    args = lm.parse_args([])
    assert args.devices == 2 and common.default_strategy(args) == "moe" and args.num_experts == 8
    assert common.default_strategy(lm.parse_args(["--devices", "1"])) == "auto"


def test_byte_data_is_the_pydoc_corpus_with_a_held_out_tail():
    common = _import_example("_common")
    data = common.ByteDataModule(seq_len=16, batch_size=4, held_out=0.1)
    corpus = common.pydoc_corpus()
    assert len(data.train_data) + len(data.val_data) == len(corpus) > 100_000
    assert bytes(data.val_data[:50].tolist()) == corpus[len(data.train_data):len(data.train_data) + 50]
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_synthetic_images_are_class_dependent():
    ic = _import_example("image_classification")
    images, labels = ic.synthetic_shapes(200, seed=0)
    assert images.shape == (200, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert set(labels.tolist()) == set(range(10))
    again, _ = ic.synthetic_shapes(200, seed=0)
    assert (again == images).all()


@pytest.mark.slow
@pytest.mark.distributed
def test_language_model_smoke_runs_expert_parallel(tmp_path):
    out = _run("language_model.py", tmp_path)  # defaults: devices=2, strategy="moe"
    assert "strategy=MoEStrategy" in out
    loss = float(re.search(r"held-out loss ([0-9.]+) nats/byte", out).group(1))
    assert 0 < loss < 6.0
    assert list((tmp_path / "logs" / "language_model").glob("version_*/events.out.tfevents.*"))


@pytest.mark.slow
def test_dense_vs_moe_smoke_writes_table_and_plot(tmp_path):
    out = _run("dense_vs_moe.py", tmp_path, "--out", str(tmp_path / "out"))
    rows = [line for line in out.splitlines() if re.match(r"\| (dense|moe|upcycled) \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["dense", "moe", "upcycled"]
    for name in ("dense_vs_moe.png", "dense_vs_moe.md", "dense_vs_moe.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0


@pytest.mark.slow
def test_image_classification_smoke_adversarial(tmp_path):
    out = _run("image_classification.py", tmp_path, "--adversarial", "fgsm", "--logger", "csv")
    assert "synthetic shapes (generated offline)" in out
    assert re.search(r"epoch \| test_acc \| test_acc_pgd\n\s+1 \| [0-9.]+ \| [0-9.]+", out), out[-2000:]
    assert list((tmp_path / "logs" / "image_classification").glob("version_*/metrics.csv"))


@pytest.mark.slow
@pytest.mark.distributed
def test_upcycle_existing_model_smoke_is_exact_then_trains_expert_parallel(tmp_path):
    out = _run("upcycle_existing_model.py", tmp_path)  # defaults: MoE phase on devices=2, strategy="moe"
    assert "upcycle: 1 block(s) -> MoE(num_experts=4, top_k=2)" in out
    difference = float(re.search(r"difference ([0-9.e+-]+)\)", out).group(1))
    assert difference < 1e-4
    assert "MoEStrategy, devices=2" in out
    assert not list((tmp_path / "logs" / "upcycle").glob("dense-*.pt"))  # the hand-off file is cleaned up
