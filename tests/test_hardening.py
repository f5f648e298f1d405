"""Issue 14's defects, each a test that failed before its fix: strategy="moe" on 2 gloo processes against one.

Multi-process runs start ``tests/scripts/hardening.py`` (one scenario a launch) through ``tests/launch.py``; the
single-process references are plain PyTorch (``ep_models.reference_train``) or a one-device Trainer here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from ep_models import reference_train  # noqa: E402
from launch import run_script  # noqa: E402

TOL = 1e-5


def _scenario(name: str, out: Path, ranks: int = 2, timeout: float = 240, **params):
    return run_script("hardening.py", name, json.dumps(params), out=out, ranks=ranks, timeout=timeout,
                      env={"OMP_NUM_THREADS": "1"})


def _max_diff(state: dict, reference: dict) -> float:
    assert set(state) == set(reference), set(state) ^ set(reference)
    return max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())


# -- defect 2 ------------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("clip", [None, 0.05])
def test_manual_optimization_reduces_expert_gradients_once_per_step(tmp_path, clip):
    """Two half-loss manual_backward calls per step on 2 ranks (ep=2) train exactly as one process on the global
    batch, with and without clip_gradients before the step."""
    run = _scenario("manual", tmp_path, clip=clip)
    assert [r["steps"] for r in run.results] == [5, 5]
    expected = reference_train(clip=clip).state_dict()
    assert _max_diff(torch.load(tmp_path / "manual.pt", weights_only=True), expected) < TOL


# -- defect 3 ------------------------------------------------------------------------------------------------


def _assert_same_optimizer_state(saved: dict, expected: dict, tol: float = 0.0) -> None:
    assert saved["param_groups"][0]["params"] == expected["param_groups"][0]["params"]
    assert set(saved["state"]) == set(expected["state"])
    for idx, st in expected["state"].items():
        assert set(saved["state"][idx]) == set(st), idx
        for key, value in st.items():
            assert saved["state"][idx][key].shape == value.shape, (idx, key)
            assert (saved["state"][idx][key].float() - value.float()).abs().max() <= tol, (idx, key)


@pytest.mark.distributed
def test_save_after_test_validate_predict_keeps_every_experts_optimizer_state(tmp_path):
    """fit with Adam at ep=2, then save; test, save; validate + predict, save: the three optimizer states are the
    same, and each holds every expert's moments as one process on the global batch has them."""
    _scenario("save_after_stages", tmp_path)
    ckpts = [torch.load(tmp_path / f"after_{stage}.ckpt", weights_only=True)["optimizer_states"][0]
             for stage in ("fit", "test", "predict")]
    reference = reference_train(adam=True).reference_optimizer.state_dict()
    _assert_same_optimizer_state(ckpts[0], reference, tol=1e-4)
    for later in ckpts[1:]:
        _assert_same_optimizer_state(later, ckpts[0])
