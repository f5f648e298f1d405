"""lightning_moe._compat: every private torch/Lightning name we rely on still exists and still does its job.

A rename upstream must fail here, loudly, instead of silently disabling a feature (the peer
watchdog, upcycle's bypass of the fused encoder kernel, DDP ignoring the expert weights, ...).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_moe import MoEStrategy, _compat
from lightning_moe.distributed.launcher import PARENT_PID_ENV, WatchedScriptLauncher

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_moe"
UPSTREAM = ("torch", "lightning", "lightning_fabric", "pytorch_lightning", "torchmetrics")
# Files still to be switched to _compat (none): add one here only while its switch is pending.
PENDING: set[str] = set()


@pytest.mark.parametrize("entry", _compat.PRIVATE_NAMES, ids=lambda e: f"{e.module}.{e.qualname}")
def test_private_name_exists(entry):
    obj = importlib.import_module(entry.module)
    for part in entry.qualname.split("."):
        assert hasattr(obj, part), f"{entry.module}.{entry.qualname} is gone ({entry.checked} had it): {entry.used_by}"
        obj = getattr(obj, part)


def test_entries_record_the_checked_versions():
    assert {e.checked for e in _compat.PRIVATE_NAMES} == {f"torch {_compat.TORCH_CHECKED}",
                                                          f"lightning {_compat.LIGHTNING_CHECKED}"}
    assert all(e.used_by for e in _compat.PRIVATE_NAMES)


def test_installed_versions_are_not_older_than_the_checked_ones():
    def release(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.match(r"\d+(\.\d+)*", text).group(0).split("."))

    assert release(torch.__version__) >= release(_compat.TORCH_CHECKED)
    assert release(version("lightning")) >= release(_compat.LIGHTNING_CHECKED)


def _private_uses(path: Path) -> list[str]:
    """Code (not comments or docstrings) in ``path`` that reaches a private torch/Lightning name itself."""
    tree = ast.parse(path.read_text())
    upstream: set[str] = set()  # local names bound to torch/Lightning modules and objects
    found = []

    def private(parts) -> bool:
        return any(p.startswith("_") and not p.startswith("__") for p in parts)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UPSTREAM:
                    upstream.add((alias.asname or alias.name).split(".")[0])
                    if private(alias.name.split(".")):
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UPSTREAM:
            upstream.update(alias.asname or alias.name for alias in node.names)
            if private(node.module.split(".")) or private(alias.name for alias in node.names):
                found.append(f"{node.lineno}: from {node.module} import {[a.name for a in node.names]}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private([node.attr]):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in upstream:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_of_the_package_reaches_a_private_name_by_itself():
    """Private torch/Lightning names are reached through _compat only, so its registry is the whole story."""
    offenders = [f"{path.relative_to(PACKAGE)}:{use}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "_compat.py" and path.relative_to(PACKAGE).as_posix() not in PENDING
                 for use in _private_uses(path)]
    assert not offenders, offenders


def test_the_scan_finds_private_uses(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nfrom torch.nn.parallel import DistributedDataParallel as DDP\n"
                      "from lightning.fabric.utilities.types import _PATH\n"
                      "# torch._hidden in a comment is fine\n"
                      "x = torch._grouped_mm\nDDP._set_params_and_buffers_to_ignore_for_model(None, [])\n"
                      "y = torch.nn.functional.relu\nbank = object()\nz = bank._parameters\n")
    uses = _private_uses(sample)
    assert [u.split(":")[0] for u in uses] == ["3", "5", "6"], uses


def test_popen_launcher_is_replaced_by_the_watched_one():
    strategy = MoEStrategy(parallel_devices=[torch.device("cpu")] * 2, cluster_environment=LightningEnvironment())
    strategy._configure_launcher()
    assert type(strategy.launcher) is WatchedScriptLauncher
    assert isinstance(strategy.launcher, _compat.SubprocessScriptLauncher)


def test_watched_launcher_exports_its_pid_to_the_children(monkeypatch):
    calls = []
    monkeypatch.setattr(_compat.SubprocessScriptLauncher, "_call_children_scripts", lambda self: calls.append(1))
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    launcher = WatchedScriptLauncher(LightningEnvironment(), 2, 1)
    launcher._call_children_scripts()
    assert calls == [1] and os.environ[PARENT_PID_ENV] == str(os.getpid())
    # Lightning's launcher still starts the children through this hook.
    assert "_call_children_scripts" in inspect.getsource(_compat.SubprocessScriptLauncher.launch)


def test_disabling_the_fused_encoder_fast_path_flag_is_what_forward_checks():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    assert layer.activation_relu_or_gelu  # precondition: relu is eligible for the fused kernel
    _compat.disable_fused_encoder_fast_path(layer)
    assert not layer.activation_relu_or_gelu
    source = inspect.getsource(nn.TransformerEncoderLayer.forward)
    assert "activation_relu_or_gelu" in source and "_transformer_encoder_layer_fwd" in source


def test_ddp_ignores_the_names_set_through_compat(tmp_path):
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    _compat.set_ddp_ignored_names(module, ["1.weight", "1.bias"])
    assert set(_compat.ddp_ignored_names(module)) == {"1.weight", "1.bias"}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        assert {"1.weight", "1.bias"} <= set(ddp.parameters_to_ignore)
    finally:
        dist.destroy_process_group()


def test_optimizer_to_device_moves_the_state_but_not_the_step():
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param])
    param.grad = torch.ones(3)
    optimizer.step()
    _compat.optimizer_to_device(optimizer, torch.device("meta"))
    state = optimizer.state[param]
    assert state["exp_avg"].device.type == "meta" and state["step"].device.type == "cpu"


def test_flatten_round_trip():
    tensors = [torch.arange(3.0), torch.ones(2, 2)]
    flat = _compat.flatten_dense_tensors(tensors)
    assert flat.shape == (7,)
    for a, b in zip(_compat.unflatten_dense_tensors(flat, tensors), tensors, strict=True):
        assert torch.equal(a, b)
