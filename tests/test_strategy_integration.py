"""MoEStrategy end to end: real ``Trainer.fit`` on 2 and 4 gloo processes against one process.

Multi-process runs start ``tests/scripts/ep_train.py`` in a subprocess (inside pytest, Lightning's
popen launcher would re-run pytest in the child ranks). One launch trains several configurations
and writes state dicts and a JSON of observations; the single-process reference is computed here
(``ep_models.reference_train``: plain PyTorch on the same global batches).

Aux and z losses are off in these equivalence models; ``tests/test_balance.py`` runs the same
equivalence (``ep_train.py aux``) with the default coefficients and loss scope.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from lightning_moe.strategy import consolidate_checkpoint  # noqa: E402

from ep_models import BalancedModel, Model, make_data, probe_input, reference_train  # noqa: E402

TOL = 1e-5


def _run(suite: str, out: Path, launcher: list[str] | None = None, timeout: float = 240, env: dict | None = None):
    cmd = (launcher or [sys.executable]) + [str(SCRIPTS / "ep_train.py"), suite, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-6000:]}")
    results = out / f"{suite}.json"
    return json.loads(results.read_text()) if results.exists() else {}


def _max_diff(state: dict, reference: dict) -> float:
    assert set(state) == set(reference), set(state) ^ set(reference)
    for name, value in reference.items():
        assert state[name].shape == value.shape, name
    return max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())


@pytest.fixture(scope="module")
def reference():
    return reference_train().state_dict()


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_main")
    return out, _run("main", out)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_torchrun")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return out, _run("torchrun", out, launcher=launcher)


@pytest.mark.distributed
def test_two_processes_match_one_process_at_ep2_and_ep1(main_run, reference):
    out, _ = main_run
    for name in ("ep2", "ep1"):
        state = torch.load(out / f"{name}.pt", weights_only=True)
        assert _max_diff(state, reference) < TOL, name
    # The comparison can fail: the model moved away from its initial weights.
    assert _max_diff(Model().state_dict(), reference) > 1e-2


@pytest.mark.distributed
def test_validate_test_predict_and_bf16(main_run):
    out, results = main_run
    model = reference_train().eval()
    x, y = make_data(2, seed=3)  # the 2 global batches eval_loader slices
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(model(x), y)
        expected_rank0 = torch.cat([model(x[:4]), model(x[8:12])])
    assert abs(results["val_loss"] - loss.item()) < TOL and abs(results["test_loss"] - loss.item()) < TOL
    assert (torch.load(out / "predict_rank0.pt", weights_only=True) - expected_rank0).abs().max() < TOL
    assert results["whole_after_predict"] == 4
    assert results["bf16_steps"] == 2 and results["bf16_finite_and_moved"]


@pytest.mark.distributed
def test_each_rank_holds_half_the_experts_during_training(main_run):
    _, results = main_run
    full = results["full_expert_numel"]
    assert results["expert_numel_per_rank"] == [full // 2, full // 2]


@pytest.mark.distributed
def test_bad_sizes_raise_before_training(main_run):
    _, results = main_run
    assert "expert_parallel_size=3 must divide the world size 2" in results["bad_world"]
    assert "layer 'net.moe1' has num_experts=3" in results["bad_experts"]
    assert "expert_parallel_size=2" in results["bad_experts"]


@pytest.mark.distributed
def test_full_checkpoint_loads_in_one_process(main_run, reference):
    out, _ = main_run
    for name in ("ep2_final.ckpt", "ep2-stepstep=3.ckpt"):  # saved after fit / by ModelCheckpoint while sharded
        model = Model.load_from_checkpoint(out / name, weights_only=True)
        assert model.net.moe1.experts.w1.shape[0] == 4 and len(model.net.moe2.experts.experts) == 4
    model = Model.load_from_checkpoint(out / "ep2_final.ckpt", weights_only=True).eval()
    assert _max_diff(model.state_dict(), reference) < TOL
    with torch.no_grad():
        assert torch.equal(model(probe_input()), torch.load(out / "ep2_probe.pt", weights_only=True))


@pytest.mark.distributed
def test_full_checkpoint_holds_the_single_process_optimizer_state(main_run):
    out, _ = main_run
    ref_opt = reference_train().reference_optimizer.state_dict()
    saved = torch.load(out / "ep2_final.ckpt", weights_only=True)["optimizer_states"][0]
    assert saved["param_groups"][0]["params"] == ref_opt["param_groups"][0]["params"]
    assert set(saved["state"]) == set(ref_opt["state"])
    for idx, st in ref_opt["state"].items():
        assert (saved["state"][idx]["momentum_buffer"] - st["momentum_buffer"]).abs().max() < TOL


@pytest.mark.distributed
def test_resume_ep2_checkpoint_at_ep1_matches(main_run, reference):
    out, _ = main_run
    assert _max_diff(torch.load(out / "resume_ep1.pt", weights_only=True), reference) < TOL


@pytest.mark.distributed
def test_gradient_accumulation_and_norm_clipping_match(main_run):
    out, _ = main_run
    expected = reference_train(steps=3, accumulate=2, clip=0.05).state_dict()
    assert _max_diff(torch.load(out / "accum_clip.pt", weights_only=True), expected) < TOL
    unclipped = reference_train(steps=3, accumulate=2).state_dict()
    assert _max_diff(unclipped, expected) > 1e-3  # clipping was active


@pytest.mark.distributed
def test_torchrun_sharded_checkpoint_reshards_and_consolidates(torchrun_run, tmp_path):
    out, results = torchrun_run
    expected = reference_train(adam=True).state_dict()
    assert results["sharded_after_fit"] is True
    directory = out / "adam-stepstep=3.ckpt"
    assert (directory / ".metadata").is_file() and (directory / "meta.pt").is_file()
    # Saved at ep=2 as DCP with Adam state, resumed at ep=1.
    assert _max_diff(torch.load(out / "adam_resume_ep1.pt", weights_only=True), expected) < TOL
    full = consolidate_checkpoint(out / "adam_final", tmp_path / "adam_final.ckpt")
    assert _max_diff(full["state_dict"], expected) < TOL
    model = Model.load_from_checkpoint(tmp_path / "adam_final.ckpt", weights_only=True)
    assert _max_diff(model.state_dict(), expected) < TOL


@pytest.mark.distributed
def test_moe_lightning_module_with_bias_balancing_matches_one_process(torchrun_run):
    import lightning.pytorch as L

    out, results = torchrun_run
    model = BalancedModel()
    L.Trainer(accelerator="cpu", devices=1, max_steps=5, reload_dataloaders_every_n_epochs=1, logger=False,
              enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False).fit(model)
    expected = model.state_dict()
    assert expected["net.moe1.router.expert_bias"].abs().sum() > 0
    assert _max_diff(torch.load(out / "balanced.pt", weights_only=True), expected) < TOL
    assert results["expert_bias_equal_on_ranks"] is True


@pytest.mark.distributed
@pytest.mark.slow
def test_four_processes_data2_x_expert2_match_and_resume_at_ep4(main_run, reference, tmp_path):
    results = _run("world4", tmp_path, env={"RESUME_CKPT": str(main_run[0] / "ep2-stepstep=3.ckpt")}, timeout=300)
    assert results["mesh"] == [[0, 1], [2, 3]]  # expert groups are contiguous ranks
    assert _max_diff(torch.load(tmp_path / "w4_ep2.pt", weights_only=True), reference) < TOL
    assert _max_diff(torch.load(tmp_path / "w4_resume_ep4.pt", weights_only=True), reference) < TOL


@pytest.mark.distributed
@pytest.mark.slow
def test_spawn_launcher_gives_back_the_whole_model(tmp_path, reference):
    _run("spawn", tmp_path)
    assert _max_diff(torch.load(tmp_path / "spawn.pt", weights_only=True), reference) < TOL


@pytest.mark.distributed
def test_a_failing_rank_ends_the_job_with_an_error(tmp_path):
    # Rank 0 raises while rank 1 sleeps outside any collective: both must exit, non-zero.
    cmd = [sys.executable, str(SCRIPTS / "ep_train.py"), "fail", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "rank 0 fails on purpose" in proc.stderr
    assert "stops instead of waiting" in proc.stderr  # rank 1 left by itself
