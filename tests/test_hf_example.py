"""examples/finetune_hf_moe.py end to end in smoke mode: from_hf, strategy="moe" on 2 processes, to_hf, reload."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers", minversion="5")

from test_examples import _run  # noqa: E402


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_hf_moe_smoke_trains_expert_parallel_and_saves_for_hf(tmp_path):
    out = _run("finetune_hf_moe.py", tmp_path, "--out", str(tmp_path / "hf_out"))
    assert "from_hf: 2 block(s) Qwen3MoeSparseMoeBlock -> MoE" in out
    assert "strategy=MoEStrategy" in out
    before, after = (float(v) for v in re.search(r"held-out loss before ([0-9.]+) after ([0-9.]+)", out).groups())
    assert 0 < after < 6.0 and 0 < before < 6.0
    difference = float(re.search(r"max difference ([0-9.e+-]+)\)", out).group(1))
    assert difference < 1e-5
    assert (tmp_path / "hf_out" / "config.json").exists()
    assert list((tmp_path / "logs" / "finetune_hf_moe").glob("version_*/events.out.tfevents.*"))
