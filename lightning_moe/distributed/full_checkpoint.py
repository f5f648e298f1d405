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
from lightning_moe.distributed.shard_layout import (
    DENSE,
    GROUPED,
    TEMPLATE,
    OptimizerLayout,
    ShardLayout,
    is_per_expert,
)


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
        if shard is None:  # DENSE
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
        if shard is None:  # DENSE
            out[name] = tensor
        elif kind == GROUPED:
            out[name] = gathered[name]
        elif shard.prefix in blocks:  # first entry of the block: emit every expert, in global order
            for g in range(shard.num_experts):
                for block_rest in blocks[shard.prefix]:
                    key = layout.template_name(shard, g, block_rest)
                    out[key] = gathered[key]
            del blocks[shard.prefix]
    return out


# What a rank holds of one parameter's optimizer state, exchanged before any tensor travels: None when
# it holds none; else per key ("tensor", shape, dtype, value of a 0-dim tensor) or ("value", the value).
_Description = dict[str, tuple] | None


def _describe(state: Mapping[int, Mapping[str, Any]], olayout: OptimizerLayout) -> dict[int, _Description]:
    out: dict[int, _Description] = {}
    for idx, name in enumerate(olayout.local_names):
        if olayout.layout.classify(name)[0] == DENSE:
            continue
        if idx not in state:
            out[idx] = None
            continue
        out[idx] = {k: ("tensor", tuple(v.shape), v.dtype, v.item() if v.ndim == 0 else None)
                    if isinstance(v, Tensor) else ("value", v) for k, v in state[idx].items()}
    return out


def _agreed_keys(name: str, held: list[dict[str, tuple]]) -> dict[str, tuple]:
    """The keys and kinds/shapes/dtypes the ranks holding state agree on (they must: one optimizer, one model)."""
    shape_of = [{k: d[:3] if d[0] == "tensor" else d[:1] for k, d in h.items()} for h in held]
    if any(s != shape_of[0] for s in shape_of):
        raise RuntimeError(f"gather_optimizer_state: the optimizer state of {name!r} has different keys or shapes on "
                           f"the ranks of its expert-parallel group ({shape_of}); every rank must step the same "
                           "optimizer over its experts")
    return held[0]


def gather_optimizer_state(optimizer: Optimizer, olayout: OptimizerLayout, group: dist.ProcessGroup,
                           is_dst: bool, device: torch.device) -> dict[str, Any]:
    """The optimizer state of the unsharded model, complete on the group's rank 0; collective over ``group``.

    First every rank describes what it holds (which expert parameters have state, and each state's
    keys, shapes and non-tensor values: one object all-gather), so that every rank then takes part in
    the same gathers, whatever it holds:

    * stacked experts (one parameter ``[L, ...]`` per rank): every tensor state whose first dim is
      the local expert count (``exp_avg``, Adafactor's factored ``row_var [L, D, 1]``, ...) is
      gathered along it; other states (Adam's ``step``) must be equal on every rank;
    * per-module (template) experts: every state of every expert, each from its owner; an expert
      without state on its rank (no token reached it, so the optimizer never stepped it) has none
      in the result either, as in single-process training. Absent ranks send zeros of the agreed shape.

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
        RuntimeError: if ranks of the group hold optimizer states of different structure for the same
            parameter, or stacked experts whose state exists or differs (``step``) on only some ranks:
            neither has a place in the unsharded model's optimizer state.
    """
    local = optimizer.state_dict()
    state = local["state"]
    described: list[dict[int, _Description]] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(described, _describe(state, olayout), group=group)
    layout = olayout.layout
    out_state: dict[int, dict[str, Any]] = {}
    for idx, name in enumerate(olayout.local_names):
        kind, shard, i, rest = layout.classify(name)
        if shard is None:  # DENSE
            if is_dst and idx in state:
                out_state[olayout.logical_index[name]] = state[idx]
            continue
        per_rank = [d[idx] for d in described]
        held = [h for h in per_rank if h is not None]
        if not held:
            continue  # no rank has state for it
        keys = _agreed_keys(name, held)
        if kind == GROUPED:
            _check_stacked(name, per_rank)
            full: dict[str, Any] = {}
            for key, desc in sorted(keys.items()):
                value = state[idx][key]
                if desc[0] == "tensor" and is_per_expert(value, shard.num_local):
                    parts = _gather(value, GROUPED, group, device)
                    if parts is not None:
                        full[key] = parts[0]
                else:
                    full[key] = value
            if is_dst:
                out_state[olayout.logical_index[name]] = full
            continue
        per_expert: list[dict[str, Any]] = [{} for _ in per_rank]  # TEMPLATE: each rank's expert i
        for key, desc in sorted(keys.items()):
            values: list[Any] | None  # per rank: its expert's tensor, or the plain value
            if desc[0] == "tensor":
                mine = state[idx][key] if idx in state else torch.zeros(desc[1], dtype=desc[2])
                values = _gather(mine, TEMPLATE, group, device)
            else:
                values = [h[key][1] if h is not None else None for h in per_rank]
            for r, part in enumerate(values or []):
                per_expert[r][key] = part
        if is_dst:
            for r, h in enumerate(per_rank):
                if h is not None:  # an expert its rank never stepped keeps no state
                    logical = layout.template_name(shard, r * shard.num_local + i, rest)
                    out_state[olayout.logical_index[logical]] = per_expert[r]
    if not is_dst:
        return local
    return {"state": dict(sorted(out_state.items())), "param_groups": olayout.param_groups(local["param_groups"])}


def _check_stacked(name: str, per_rank: list[_Description]) -> None:
    # One stacked parameter holds every expert in the unsharded model: one state, one step.
    if any(h is None for h in per_rank):
        raise RuntimeError(f"gather_optimizer_state: stacked experts {name!r} have optimizer state on some ranks of "
                           "their expert-parallel group only; the unsharded model holds them in one parameter")
    scalars = [{k: d for k, d in h.items() if d[0] == "value" or (d[0] == "tensor" and d[3] is not None)}
               for h in per_rank if h is not None]
    if any(s != scalars[0] for s in scalars):
        raise RuntimeError(f"gather_optimizer_state: stacked experts {name!r} have different scalar optimizer "
                           f"states on the ranks of their expert-parallel group ({scalars}); the unsharded model "
                           "holds them in one parameter with one state")
