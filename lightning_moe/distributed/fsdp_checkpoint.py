"""DCP checkpoints of an FSDP2-sharded MoE model, in the format of :mod:`~lightning_moe.distributed.sharded_checkpoint`.

Under ``data_parallel="fsdp"`` every tensor of the model is a ``DTensor`` shard: dense ones over the world mesh,
an expert bank's stacked weights ``[L, D, H]`` over the ``data`` mesh (dim 1), ``L`` being this rank's experts
of the expert-parallel group. For the checkpoint each expert tensor is seen as its *logical* tensor
``[E, D, H]`` on the ``("data", "expert")`` mesh, placements ``(Shard(1), Shard(0))``: the same local memory,
no copy, no gather. Keys, names and shapes are those of the DDP sharded format (``model/<name>``,
``optim<j>/<name>/<key>``, ``meta.pt``), so a directory written by either reshards on resume into either, at any
(expert-parallel, data-parallel) size, optimizer state included, and
:func:`~lightning_moe.distributed.sharded_checkpoint.consolidate_checkpoint` turns it into a full file.

Loading builds a template out of the live parameters and optimizer states (views of their shards) and lets
``torch.distributed.checkpoint.load`` read each rank's chunks straight into them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_moe.distributed.expert_parallel import ExpertShard
from lightning_moe.distributed.shard_layout import GROUPED, OptimizerLayout, ShardLayout
from lightning_moe.distributed.sharded_checkpoint import META_FILENAME

__all__ = ["load", "model_state", "optimizer_state"]


def _logical(value: Tensor, kind: str, shard: ExpertShard | None, mesh) -> Tensor:
    """A stacked-expert ``DTensor`` shard ``[L, ...]`` over ``data`` as the logical ``[E, ...]`` over the 2-D mesh."""
    from torch.distributed.tensor import DTensor, Shard

    if kind != GROUPED or shard is None or not isinstance(value, DTensor) or mesh is None:
        return value
    shape = torch.Size([shard.num_experts, *value.shape[1:]])
    return DTensor.from_local(value.to_local(), mesh, [value.placements[0], Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def model_state(module: nn.Module, layout: ShardLayout, mesh) -> dict[str, Tensor]:
    """``{logical name: tensor}`` of this rank's shards (views, no copy) for a DCP save."""
    out = {}
    for name, value in module.state_dict().items():
        kind, shard, _, _ = layout.classify(name)
        out[layout.logical_name(name)] = _logical(value, kind, shard, mesh)
    return out


def _init_state(optimizer: Optimizer) -> None:
    """Create the optimizer's state (a step with zero gradients and lr 0) so that a load has tensors to fill."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        return
    lrs = [group.get("lr") for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], Tensor) else 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if lr is not None:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def optimizer_state(optimizer: Optimizer, olayout: OptimizerLayout, mesh) -> dict[str, Any]:
    """``{"state": {logical name: {key: value}}, "param_groups": [... logical names ...]}`` of this rank (views)."""
    local = optimizer.state_dict()
    layout = olayout.layout
    state = {}
    for idx, st in local["state"].items():
        name = olayout.local_names[idx]
        kind, shard, _, _ = layout.classify(name)
        param = olayout.params[idx]
        state[layout.logical_name(name)] = {
            k: _logical(v, kind, shard, mesh) if isinstance(v, Tensor) and v.shape == param.shape else v
            for k, v in st.items()
        }
    return {"state": state, "param_groups": olayout.param_groups(local["param_groups"], key=str)}


def load(path: Path, module: nn.Module, optimizers: list[Optimizer], layout: ShardLayout, mesh,
         weights_only: bool | None = None) -> dict[str, Any]:
    """Read a DCP directory into the live shards of ``module`` and ``optimizers``; collective over every rank.

    Args:
        path: the checkpoint directory (written by either data-parallel mode, at any sizes).
        module: the FSDP2-sharded model.
        optimizers: its optimizers (their state is created first when empty).
        layout: name mapping of the expert-sharded layers.
        mesh: the ``("data", "expert")`` mesh.
        weights_only: passed to ``torch.load`` for ``meta.pt``.

    Returns:
        The Lightning checkpoint dict (everything in ``meta.pt``) with ``state_dict`` (logical names, this rank's
        shards) and ``optimizer_states`` (each optimizer's own ``state_dict()``, already loaded).

    Raises:
        KeyError: if the checkpoint lacks a parameter of ``module`` or a tensor state of an optimizer.
    """
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    meta = torch.load(path / META_FILENAME, weights_only=True if weights_only is None else weights_only)
    meta_optimizers = meta.pop("moe_optimizer_states", [])
    template: dict[str, Any] = {}
    state_dict = model_state(module, layout, mesh)
    for name, value in state_dict.items():
        template[f"model/{name}"] = value
    olayouts = []
    for j, optimizer in enumerate(optimizers):
        _init_state(optimizer)
        olayout = OptimizerLayout(optimizer, module, layout)
        olayouts.append(olayout)
        for name, st in optimizer_state(optimizer, olayout, mesh)["state"].items():
            for key, value in st.items():
                if isinstance(value, Tensor):
                    template[f"optim{j}/{name}/{key}"] = value
    missing = sorted(k for k in template if k not in metadata)
    if missing:
        raise KeyError(f"MoEStrategy: the checkpoint {str(path)!r} has no {missing[:3]} ({len(missing)} missing); "
                       "resume with the same model and configure_optimizers")
    dcp.load(template, checkpoint_id=str(path))  # into the shards themselves
    for optimizer, olayout, saved in zip(optimizers, olayouts, meta_optimizers, strict=False):
        _restore_groups_and_extras(optimizer, olayout, saved)
    return {**meta, "state_dict": state_dict, "optimizer_states": [o.state_dict() for o in optimizers]}


def _restore_groups_and_extras(optimizer: Optimizer, olayout: OptimizerLayout, saved: dict[str, Any]) -> None:
    """Hyperparameters of each parameter group (lr after schedulers, ...) and non-tensor states from ``meta.pt``."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"MoEStrategy: the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, "
                         f"this one {len(optimizer.param_groups)}; resume with the same configure_optimizers")
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    layout = olayout.layout
    extras = saved.get("extra_state", {})
    for name, param in zip(olayout.local_names, olayout.params, strict=True):
        extra = extras.get(layout.logical_name(name))
        if extra:
            optimizer.state[param].update(extra)
