"""Prune experts: remove whole experts from a layer (and its optimizer state), or mask hidden units.

The surgery behind :mod:`lightning_moe.callbacks.pruning` (which only decides when), usable on
its own (``examples/compress_experts.py``):

* :func:`choose_experts` picks the experts to keep from routing counts;
* :func:`remove_experts` removes the others from an unsharded layer, :func:`remove_sharded_experts`
  from a layer sharded by expert parallelism (gathered over its group, pruned, sharded again, with
  the optimizer state of its experts); :func:`prune_experts` picks the right one;
* :func:`remap_optimizers` points optimizers at the new parameters, keeping the state of kept rows;
* :func:`hidden_unit_mask` is the per-expert hidden-neuron mask of structured magnitude pruning.

Shape legend: E experts (global), J kept experts, L of them held by this rank, D model width,
H expert hidden width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_moe.distributed.expert_parallel import ExpertParallelDispatcher, expert_group, expert_shard
from lightning_moe.distributed.gather import gather_experts
from lightning_moe.distributed.shard_layout import is_per_expert
from lightning_moe.nn.experts import GroupedExperts, TemplateExperts
from lightning_moe.nn.moe import MoE

KEPT_BUFFER = "kept_experts"  # persistent buffer of a pruned layer: ids (in the unpruned layer) of its experts
# old parameter id -> (old parameter, new parameter or None when removed, kept rows; None: state already moved)
Remap = dict[int, tuple[nn.Parameter, "nn.Parameter | None", "Tensor | None"]]


def choose_experts(
    counts_E: Tensor, keep: int | float | None, min_share: float | None, top_k: int, multiple_of: int = 1
) -> tuple[Tensor, list[str]]:
    """Which experts to keep, most used first.

    Keeps the ``keep`` most used experts (``int``, or a fraction of E as ``float``) and drops any
    whose share of the token->expert assignments is below ``min_share``; then raises the count to
    at least ``top_k`` and to a multiple of ``multiple_of`` (more experts kept, never fewer than asked).

    Args:
        counts_E: assignments per expert over the counting window.
        keep: experts to keep (int >= 1) or fraction of E (float in (0, 1]); None: no limit.
        min_share: minimum share of assignments to stay; None: no threshold.
        top_k: the layer's top_k (a layer needs at least that many experts).
        multiple_of: the expert-parallel size.

    Returns:
        ``(keep_J sorted ascending, notes)``; notes say when the count was raised.
    """
    num_experts = counts_E.numel()
    counts_E = counts_E.detach().double().cpu()
    order_E = torch.sort(counts_E, descending=True, stable=True).indices  # ties: lower id first
    target = num_experts
    if keep is not None:
        target = keep if isinstance(keep, int) else max(1, math.floor(keep * num_experts + 1e-9))
    if min_share is not None:
        share_E = counts_E / counts_E.sum().clamp_min(1)
        target = min(target, int((share_E >= min_share).sum()))
    notes = []
    wanted = max(target, top_k, 1)
    if wanted != target:
        notes.append(f"kept {wanted} (top_k={top_k}) instead of {target}")
    rounded = min(num_experts, math.ceil(wanted / multiple_of) * multiple_of)
    if rounded != wanted:
        notes.append(f"kept {rounded} (a multiple of expert_parallel_size={multiple_of}) instead of {wanted}")
    return order_E[:rounded].sort().values, notes


@torch.no_grad()
def remove_experts(layer: MoE, keep_E: Tensor) -> Remap:
    """Keep only the experts ``keep_E`` (global ids) of ``layer``, in place; the others are gone.

    Router rows (``gate.weight``, ``expert_bias``), expert weights (every tensor of a stacked bank
    whose first dim is the expert, pruning masks and compressed banks included, or the modules of
    :class:`TemplateExperts`) and the layer's stat buffers shrink to ``J`` experts, renumbered
    ``0..J-1`` in their old order. ``top_k`` is clamped to ``J`` with a warning.

    Args:
        layer: an unsharded MoE layer (``layer.experts`` holds every expert).
        keep_E: ids of the experts to keep (any order, unique).

    Returns:
        For the optimizer: old parameter id -> ``(old, new or None, kept rows or None)``.

    Raises:
        ValueError: when the layer is sharded or ``keep_E`` is empty or out of range.
    """
    name = layer.display_name
    bank = layer.experts
    if bank.num_experts != layer.num_experts:
        raise ValueError(f"ExpertPruning: layer {name} holds {bank.num_experts} of its {layer.num_experts} experts "
                         "(sharded by expert parallelism); prune with expert_parallel_size=1")
    keep_J = torch.as_tensor(keep_E, dtype=torch.long).flatten().unique(sorted=True).cpu()
    if keep_J.numel() == 0 or int(keep_J.min()) < 0 or int(keep_J.max()) >= layer.num_experts:
        raise ValueError(f"ExpertPruning: keep={keep_J.tolist()} must be non-empty expert ids of layer {name} "
                         f"(0..{layer.num_experts - 1})")
    old_e, k = layer.num_experts, keep_J.numel()
    remap: Remap = {}

    def shrink_param(module: nn.Module, attr: str) -> None:
        old = getattr(module, attr)
        rows = keep_J.to(old.device)
        new = nn.Parameter(old.detach().index_select(0, rows).clone(), requires_grad=old.requires_grad)
        setattr(module, attr, new)
        remap[id(old)] = (old, new, rows)

    def shrink_buffer(module: nn.Module, attr: str) -> None:
        old = getattr(module, attr)
        setattr(module, attr, old.index_select(0, keep_J.to(old.device)).clone())

    # 1. Router: one gate row (and bias entry) per expert.
    router, gate = layer.router, layer.router.gate
    assert isinstance(gate, nn.Linear)  # every MoE router scores with an nn.Linear gate
    shrink_param(gate, "weight")
    gate.out_features = k
    if getattr(router, "expert_bias", None) is not None:
        shrink_buffer(router, "expert_bias")
    router.num_experts = k

    # 2. Experts: every per-expert tensor, or the per-expert modules.
    if isinstance(bank, TemplateExperts):
        kept = set(keep_J.tolist())
        for e, module in enumerate(bank.experts):
            if e not in kept:
                remap.update({id(p): (p, None, None) for p in module.parameters()})
        bank.experts = nn.ModuleList(bank.experts[e] for e in keep_J.tolist())
    else:
        for attr, p in list(bank.named_parameters(recurse=False)):
            if p.dim() and p.shape[0] == old_e:
                shrink_param(bank, attr)
        for attr, b in list(bank.named_buffers(recurse=False)):
            if b.dim() and b.shape[0] == old_e:
                shrink_buffer(bank, attr)
    bank.num_experts = k

    # 3. Layer: size, stat buffers, top_k, and which experts of the original layer it holds: a state dict
    # saved from here on says it was pruned, so that loading it shrinks a fresh layer first (shrink_to_saved).
    layer.num_experts = k
    for attr in ("tokens_per_expert", "global_tokens_per_expert"):
        shrink_buffer(layer, attr)
    held = getattr(layer, KEPT_BUFFER, None)
    original_J = keep_J if held is None else held.index_select(0, keep_J.to(held.device)).cpu()
    layer.register_buffer(KEPT_BUFFER, original_J.to(layer.tokens_per_expert.device).clone())
    if layer.top_k > k:
        rank_zero_warn(f"ExpertPruning: layer {name} keeps {k} experts < top_k={layer.top_k}; top_k is now {k}")
        layer.top_k = k
        router.top_k = k
    return remap


@torch.no_grad()
def remove_sharded_experts(layer: MoE, path: str, keep_E: Tensor, optimizers: Sequence[torch.optim.Optimizer]
                           ) -> Remap:
    """:func:`remove_experts` for a layer sharded by expert parallelism (collective over its EP group).

    Gathers the experts (and their optimizer state) of the EP group, removes experts from the full
    layer, and shards it again over the same group (``J`` must be a multiple of its size). Every
    rank of the group must call it with the same ``keep_E``, for its layers in the same order.

    Args:
        layer: a layer sharded by :func:`~lightning_moe.distributed.shard_moe_layer`, ``GroupedExperts``.
        path: its module path (state-dict names and error messages).
        keep_E: global ids of the experts to keep.
        optimizers: optimizers that may hold state of the layer's experts; it moves to the new layout.

    Returns:
        For :func:`remap_optimizers`: old parameter id -> ``(old, new or None, kept rows or None)``.

    Raises:
        ValueError: when the layer is not sharded or its experts are not ``GroupedExperts``.
    """
    shard, bank = expert_shard(layer), layer.experts
    if shard is None or not isinstance(bank, GroupedExperts):
        raise ValueError(f"ExpertPruning: layer {path!r} holds {bank.num_experts} of its {layer.num_experts} experts "
                         f"in a {type(bank).__name__} that is not sharded by MoEStrategy; pruning sharded layers "
                         "needs GroupedExperts sharded by strategy='moe' (or prune with expert_parallel_size=1)")
    group = expert_group(layer)
    old_params = dict(bank.named_parameters(recurse=False))
    # 1. Optimizer state of the group's experts, gathered along the expert dim (same order on every rank).
    full_state: dict[str, tuple[torch.optim.Optimizer, dict, set]] = {}
    for attr, p in old_params.items():
        for optimizer in optimizers:
            if p not in optimizer.state:
                continue
            state, gathered = {}, set()
            for key in sorted(optimizer.state[p]):
                value = optimizer.state[p][key]
                if is_per_expert(value, p.shape[0]):  # moments, factored (Adafactor) states: one row per expert
                    value = gather_experts(value, group)
                    gathered.add(key)
                state[key] = value
            full_state[attr] = (optimizer, state, gathered)
    # 2. Full layer, prune, shard again: new local expert j is kept expert offset + j. The remap of
    # the (unsharded, optimizer-less) full expert tensors is harmless; the router's is needed. Every
    # per-expert tensor of the bank travels under its own name: magnitude pruning's w1_orig and w1_mask
    # too (its forward pre-hook recomputes w1 from them), which is why this does not unshard by weight name.
    _replace_rows(bank, shard.num_local, lambda t: gather_experts(t, group))
    bank.num_experts, bank.expert_offset = shard.num_experts, 0
    layer.expert_dispatcher = None
    remap = remove_experts(layer, keep_E)
    keep_J = torch.as_tensor(keep_E, dtype=torch.long).flatten().unique(sorted=True)
    if keep_J.numel() % shard.ep_size:
        raise ValueError(f"ExpertPruning: layer {path!r} keeps {keep_J.numel()} experts, not a multiple of its "
                         f"expert_parallel_size={shard.ep_size}; keep a multiple of it")
    new_shard = dataclasses.replace(shard, num_experts=keep_J.numel())
    lo, hi = new_shard.offset, new_shard.offset + new_shard.num_local
    _replace_rows(bank, new_shard.num_experts, lambda t: t[lo:hi].clone())
    bank.num_experts, bank.expert_offset = new_shard.num_local, lo
    layer.expert_dispatcher = ExpertParallelDispatcher(new_shard, group)
    rows_L = keep_J[new_shard.offset:new_shard.offset + new_shard.num_local]
    for attr, old in old_params.items():
        if attr in full_state:
            optimizer, state, gathered = full_state[attr]
            optimizer.state[old] = {k: v.index_select(0, rows_L.to(v.device)).clone() if k in gathered else v
                                    for k, v in state.items()}
        remap[id(old)] = (old, getattr(bank, attr), None)
    return remap


def _replace_rows(bank: nn.Module, rows: int, fn: Callable[[Tensor], Tensor]) -> None:
    """Replace each parameter and buffer of ``bank`` with first dim ``rows`` (one row per expert) by ``fn`` of it."""
    for attr, param in list(bank.named_parameters(recurse=False)):
        if param.dim() and param.shape[0] == rows:
            setattr(bank, attr, nn.Parameter(fn(param.detach()), requires_grad=param.requires_grad))
    for attr, buffer in list(bank.named_buffers(recurse=False)):
        if buffer.dim() and buffer.shape[0] == rows:
            setattr(bank, attr, fn(buffer))


def prune_experts(layer: MoE, path: str, keep_E: Tensor, optimizers: Sequence[torch.optim.Optimizer] = ()
                  ) -> Remap:
    """:func:`remove_sharded_experts` when ``layer`` holds only some of its experts, else :func:`remove_experts`.

    A no-op (empty remap) when ``keep_E`` keeps every expert. Follow with :func:`remap_optimizers`.
    """
    if torch.as_tensor(keep_E).flatten().unique().numel() >= layer.num_experts:
        return {}
    if layer.experts.num_experts != layer.num_experts:
        return remove_sharded_experts(layer, path, keep_E, optimizers)
    return remove_experts(layer, keep_E)


def saved_expert_counts(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Experts of every pruned layer in a saved state: ``{layer path: J}`` from the ``kept_experts`` entries.

    Args:
        shapes: name -> shape of every tensor of a saved model state (a state dict's tensors' shapes,
            or a DCP directory's metadata).
    """
    suffix = f".{KEPT_BUFFER}"
    return {name[: -len(suffix)] if name != KEPT_BUFFER else "": int(shape[0])
            for name, shape in shapes.items() if name == KEPT_BUFFER or name.endswith(suffix)}


def shrink_to_saved(module: nn.Module, counts: Mapping[str, int], optimizers: Sequence[torch.optim.Optimizer] = ()
                    ) -> bool:
    """Before loading a state saved after expert pruning: shrink each layer to the saved number of experts.

    Every value of the shrunk layer (router rows, experts, ``expert_bias``, ``kept_experts``) is then
    overwritten by the load, so the layer keeps its first ``J`` experts. Sharded layers are gathered
    and sharded again (a collective over their group, as :func:`prune_experts`); optimizers follow
    the new parameters (their state comes from the checkpoint too).

    Args:
        module: the model about to load the state.
        counts: ``{layer path: J}`` (:func:`saved_expert_counts`).
        optimizers: optimizers over ``module``'s parameters.

    Returns:
        True when a layer changed (parameters were replaced: re-wrap DDP).

    Raises:
        ValueError: if a saved layer holds more experts than the layer it loads into.
    """
    remap: Remap = {}
    for path, layer in [(n, m) for n, m in module.named_modules() if isinstance(m, MoE)]:
        k = counts.get(path)
        if k is None or k == layer.num_experts:
            continue
        if k > layer.num_experts:
            raise ValueError(f"ExpertPruning: the saved layer {path!r} holds {k} experts, more than the "
                             f"{layer.num_experts} of the layer loading it; load into a model of the saved size")
        remap.update(prune_experts(layer, path, torch.arange(k), optimizers))
    if remap:
        remap_optimizers(optimizers, remap)
    return bool(remap)


def shrink_to_saved_hook(layer: MoE, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """``MoE``'s load-state-dict pre-hook: a state saved after pruning shrinks an unsharded layer first."""
    saved = state_dict.get(prefix + KEPT_BUFFER)
    if not isinstance(saved, Tensor) or saved.ndim != 1:
        return
    if saved.numel() != layer.num_experts:
        if expert_shard(layer) is not None:
            raise ValueError(f"ExpertPruning: layer {prefix[:-1]!r} is sharded over expert-parallel ranks; the "
                             "strategy shrinks it before loading a state saved after pruning, not load_state_dict")
        shrink_to_saved(layer, {"": saved.numel()})
    elif getattr(layer, KEPT_BUFFER, None) is None:  # a layer built at the pruned size: hold the ids too
        layer.register_buffer(KEPT_BUFFER, torch.zeros_like(saved, device=next(layer.parameters()).device))


def remap_optimizers(optimizers: Sequence[torch.optim.Optimizer], remap: Remap) -> None:
    """Point optimizers at the new parameters, keeping the state (momentum, Adam moments) of kept rows."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if id(p) not in remap:
                    params.append(p)
                    continue
                old, new, rows = remap[id(p)]
                state = optimizer.state.pop(old, None)
                if new is None:
                    continue
                if state and rows is None:  # already in the new layout
                    optimizer.state[new] = state
                elif state:
                    optimizer.state[new] = {
                        key: value.index_select(0, rows).clone() if is_per_expert(value, old.shape[0]) else value
                        for key, value in state.items()
                    }
                params.append(new)
            group["params"] = params


def hidden_unit_mask(bank: GroupedExperts, amount: int | float) -> Tensor:
    """Per-expert hidden-neuron mask ``[E, H]`` (1 keep, 0 pruned) by L1 importance.

    Unit ``h`` of expert ``e`` weighs ``|w1[e, :, h]|_1 + |w3[e, :, h]|_1 + |w2[e, h, :]|_1`` (of
    the current, already masked weights). Each expert prunes ``amount`` of its units still alive
    (a float fraction, torch's iterative semantics) or ``amount`` more units (int); units pruned
    before stay pruned.
    """
    w1, w2, w3 = bank.w1, bank.w2, bank.w3  # the masked weights when the bank is already pruned
    importance_EH = w1.detach().abs().sum(1) + w2.detach().abs().sum(2)
    if w3 is not None:
        importance_EH = importance_EH + w3.detach().abs().sum(1)
    mask = getattr(bank, "w1_mask", None)
    alive_EH = mask.amax(dim=1) > 0 if mask is not None else torch.ones_like(importance_EH, dtype=torch.bool)
    alive_E = alive_EH.sum(-1)
    more_E = torch.round(amount * alive_E.double()).long() if isinstance(amount, float) else alive_E.clamp(max=amount)
    prune_E = (~alive_EH).sum(-1) + more_E  # dead units sort first (importance -inf): they stay pruned
    importance_EH = importance_EH.float().masked_fill(~alive_EH, -math.inf)
    rank_EH = importance_EH.argsort(dim=-1, stable=True).argsort(dim=-1)
    return (rank_EH >= prune_E[:, None]).to(w1.dtype)
