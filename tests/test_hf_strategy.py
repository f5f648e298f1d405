"""A converted Hugging Face Qwen3-MoE trains under Trainer(strategy="moe") on 2 gloo ranks (experts sharded
over both), and its checkpoints -- the full one and a consolidated sharded one -- convert back and load in HF
with the trained model's logits."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", minversion="5")

from launch import run_script  # noqa: E402


@pytest.mark.distributed
@pytest.mark.slow
def test_converted_qwen3_moe_trains_expert_parallel_and_loads_back_in_hf(tmp_path):
    ranks = run_script("hf_qwen3_ep.py", out=tmp_path, ranks=2, timeout=600).results
    result = ranks[0]
    assert result["moved"] > 1e-3  # training changed the model, so the comparisons below can fail
    assert result["w1_shape"] == [4, 16, 16]  # the full checkpoint holds every expert, not rank 0's two
    assert result["full_ckpt"] < 1e-5
    assert result["module"] < 1e-5
    assert result["consolidated"] < 1e-5
