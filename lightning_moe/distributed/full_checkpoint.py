"""The full checkpoint format: one file holding the whole logical model, gathered to rank 0.

Rank 0 gathers every expert tensor, and every expert's optimizer state, over its expert-parallel
group; the optimizer state is indexed exactly as an unsharded model's optimizer would index it, so
the file loads with ``Model.load_from_checkpoint`` in a plain process. Loading slices this rank's
experts out (:func:`~lightning_moe.distributed.shard_layout.local_model_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_moe.distributed.gather import gather_experts
from lightning_moe.distributed.shard_layout import DENSE, GROUPED, TEMPLATE, OptimizerLayout, ShardLayout


def _gather(tensor: Tensor, kind: str, group: dist.ProcessGroup, device: torch.device) -> list[Tensor] | None:
    """The slices of a per-expert tensor of every rank of ``group``, on its rank 0 and the CPU (None elsewhere).

    One tensor ``[E, *]`` for stacked experts (``GROUPED``); for a template expert's tensor, one
    tensor per rank (its expert of the same local index), in group-rank order. Travels through
    ``device`` (CUDA for NCCL).
    """
    template = kind == TEMPLATE
    full = gather_experts(tensor.to(device), group, stack=template, dst=0)
    if full is None:
        return None
    return [full[r].to("cpu", copy=True) for r in range(full.shape[0])] if template else [full.cpu()]


def gather_model_state(state: Mapping[str, Tensor], layout: ShardLayout, group: dist.ProcessGroup,
                       is_dst: bool, device: torch.device) -> dict[str, Tensor]:
    """The logical state dict, complete on the group's rank 0 (``is_dst``); collective over ``group``.

    Args:
        state: this rank's (sharded) state dict.
        layout: name mapping of the sharded layers.
        group: the expert-parallel group holding the shards (the one containing global rank 0).
        is_dst: True on the rank that receives (group rank 0).
        device: where tensors travel (the rank's device: CUDA for NCCL).

    Returns:
        On the destination, the state dict of the unsharded model (global expert ids and shapes, in
        the unsharded order); elsewhere ``state`` unchanged.
    """
    gathered: dict[str, Tensor] = {}
    blocks: dict[str, list[str]] = {}  # template layer prefix -> logical names in unsharded order
    for name, tensor in state.items():
        kind, shard, local, rest = layout.classify(name)
        if kind == DENSE:
            continue
        parts = _gather(tensor, kind, group, device)
        if parts is None:
            continue
        if kind == GROUPED:
            gathered[name] = parts[0]
        else:
            for r, part in enumerate(parts):
                gathered[layout.template_name(shard, r * shard.num_local + local, rest)] = part
            if local == 0:
                blocks.setdefault(shard.prefix, []).append(rest)
    if not is_dst:
        return dict(state)
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        kind, shard, local, rest = layout.classify(name)
        if kind == DENSE:
            out[name] = tensor
        elif kind == GROUPED:
            out[name] = gathered[name]
        elif shard.prefix in blocks:  # first entry of the block: emit every expert, in global order
            for g in range(shard.num_experts):
                for r in blocks[shard.prefix]:
                    out[layout.template_name(shard, g, r)] = gathered[layout.template_name(shard, g, r)]
            del blocks[shard.prefix]
    return out


def _signature(state: Mapping[int, Mapping[str, Any]], olayout: OptimizerLayout) -> list:
    sig = []
    for idx, name in enumerate(olayout.local_names):
        if olayout.layout.classify(name)[0] != DENSE:
            st = state.get(idx, {})
            sig.append((idx, sorted((k, tuple(v.shape) if isinstance(v, Tensor) else None) for k, v in st.items())))
    return sig


def gather_optimizer_state(optimizer: Optimizer, olayout: OptimizerLayout, group: dist.ProcessGroup,
                           is_dst: bool, device: torch.device) -> dict[str, Any]:
    """The optimizer state of the unsharded model, complete on the group's rank 0; collective over ``group``.

    Args:
        optimizer: this rank's optimizer.
        olayout: its logical layout.
        group: the expert-parallel group containing the destination.
        is_dst: True on group rank 0.
        device: where tensors travel (the rank's device: CUDA for NCCL).

    Returns:
        On the destination, ``{"state": {logical index: {...}}, "param_groups": [...]}`` as
        ``optimizer.state_dict()`` of the unsharded model would be; elsewhere the local state dict.

    Raises:
        RuntimeError: if ranks of the group hold different optimizer-state structures (which would
            make the gathers mismatch).
    """
    local = optimizer.state_dict()
    state = local["state"]
    signatures = [None] * dist.get_world_size(group)
    dist.all_gather_object(signatures, _signature(state, olayout), group=group)
    if any(s != signatures[0] for s in signatures):
        raise RuntimeError("gather_optimizer_state: expert optimizer states differ in structure between the ranks of "
                           "an expert-parallel group; every rank must step the same optimizer over its experts")
    layout = olayout.layout
    out_state: dict[int, dict[str, Any]] = {}
    for idx, name in enumerate(olayout.local_names):
        if idx not in state:
            continue
        kind, shard, i, rest = layout.classify(name)
        if kind == DENSE:
            if is_dst:
                out_state[olayout.logical_index[name]] = state[idx]
            continue
        param = olayout.params[idx]
        full: dict[str, Any] = {}  # GROUPED: the state of every expert
        per_expert: list[dict[str, Any]] = [{} for _ in range(shard.ep_size)]  # TEMPLATE: each rank's expert i
        for key in sorted(state[idx]):
            value = state[idx][key]
            if isinstance(value, Tensor) and value.shape == param.shape:
                parts = _gather(value, kind, group, device)
                if parts is None:
                    continue
            else:  # a scalar (Adam's step) or a value of another shape: rank 0's
                parts = [value] * (1 if kind == GROUPED else shard.ep_size)
            if kind == GROUPED:
                full[key] = parts[0]
            else:
                for r, part in enumerate(parts):
                    per_expert[r][key] = part
        if not is_dst:
            continue
        if kind == GROUPED:
            out_state[olayout.logical_index[name]] = full
        else:
            for r in range(shard.ep_size):
                logical = layout.template_name(shard, r * shard.num_local + i, rest)
                out_state[olayout.logical_index[logical]] = per_expert[r]
    if not is_dst:
        return local
    return {"state": dict(sorted(out_state.items())), "param_groups": olayout.param_groups(local["param_groups"])}
