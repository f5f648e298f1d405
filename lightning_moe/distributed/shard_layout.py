"""Logical names and shapes of a model whose experts are sharded by expert parallelism.

A sharded rank names its tensors locally: ``layer.experts.w1`` holds rows ``[lo, hi)`` of the
stacked experts, ``layer.experts.experts.0.weight`` is global expert ``lo``. Checkpoints (both
formats: :mod:`~lightning_moe.distributed.full_checkpoint` and
:mod:`~lightning_moe.distributed.sharded_checkpoint`) always use the *logical* names and shapes,
those of the same model holding every expert in one process, so they load in a plain process and
reshard at any expert-parallel size. :class:`ShardLayout` maps model names, :class:`OptimizerLayout`
optimizer indices; :func:`local_model_state` and :func:`local_optimizer_state` take this rank's part
out of a logical state (from either format).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_moe.distributed.expert_parallel import ExpertShard

_TEMPLATE = re.compile(r"experts\.(\d+)\.(.+)")
DENSE, GROUPED, TEMPLATE = "dense", "grouped", "template"


class ShardLayout:
    """Maps this rank's state-dict names to logical names.

    Args:
        shards: the :class:`ExpertShard` of every sharded MoE layer (names relative to the module
            whose state dict is converted).
    """

    def __init__(self, shards: list[ExpertShard]) -> None:
        self.shards = sorted(shards, key=lambda s: len(s.prefix), reverse=True)  # innermost first

    def classify(self, name: str) -> tuple[str, ExpertShard | None, int, str]:
        """``(kind, shard, local expert index, rest of the name)`` of a local state-dict name.

        ``shard`` is None exactly when ``kind`` is ``DENSE``.
        """
        for shard in self.shards:
            if name.startswith(shard.prefix):
                rest = name[len(shard.prefix):]
                if not shard.template:
                    return GROUPED, shard, -1, rest
                match = _TEMPLATE.fullmatch(rest)
                if match:
                    return TEMPLATE, shard, int(match.group(1)), match.group(2)
        return DENSE, None, -1, name

    @staticmethod
    def template_name(shard: ExpertShard, global_id: int, rest: str) -> str:
        return f"{shard.prefix}experts.{global_id}.{rest}"

    def logical_name(self, name: str) -> str:
        kind, shard, local, rest = self.classify(name)
        if shard is None or kind != TEMPLATE:
            return name
        return self.template_name(shard, shard.offset + local, rest)


def local_model_state(state: Mapping[str, Tensor], local_state: Mapping[str, Tensor],
                      layout: ShardLayout) -> dict[str, Tensor]:
    """This rank's state dict out of a logical one (full tensors, or already this rank's slices).

    Args:
        state: logical state dict (from a checkpoint).
        local_state: the module's current state dict (gives the local names).
        layout: name mapping of the sharded layers.

    Returns:
        A state dict with local names and shapes; logical entries this rank does not hold are left
        out, unknown ones kept (so ``load_state_dict(strict=True)`` still reports them).
    """
    out: dict[str, Tensor] = {}
    consumed = set()
    for name in local_state:
        kind, shard, _, _ = layout.classify(name)
        key = layout.logical_name(name)
        if key not in state:
            continue
        consumed.add(key)
        value = state[key]
        if shard is not None and kind == GROUPED:
            value = _rows(value, shard)
        out[name] = value
    for key, value in state.items():
        if key not in consumed and layout.classify(key)[0] == DENSE:
            out[key] = value
    return out


def is_per_expert(value: Any, num_local: int) -> bool:
    """Whether an optimizer state of a stacked expert parameter ``[L, ...]`` holds one row per expert.

    True for tensors whose first dim is ``L``: the parameter's shape (``exp_avg``) or a factored one
    (Adafactor's ``row_var [L, D, 1]`` and ``col_var [L, 1, H]``). Such states are split and gathered
    along dim 0 like the parameter; the others (Adam's 0-dim ``step``) are one value for the whole bank.
    With one expert per rank, a state reduced over dim 0 (Adafactor's ``col_var [1, H]`` of a
    ``[1, H]`` bias) cannot be told apart and counts as per expert.
    """
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == num_local


def _rows(value: Any, shard: ExpertShard) -> Any:
    """This rank's rows of a full stacked-expert tensor; tensors already sliced pass through."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == shard.num_experts != shard.num_local:
        return value[shard.offset:shard.offset + shard.num_local]
    return value


class OptimizerLayout:
    """Logical parameter order of an optimizer whose parameters include sharded experts.

    An unsharded model's optimizer lists every expert; ours lists this rank's. Per parameter group,
    the logical list is the local list with stacked experts at full size and each per-module expert
    block expanded to all global experts (in the unsharded module order), so a full optimizer state
    is indexed exactly as single-process training would index it.

    Args:
        optimizer: the (local) optimizer.
        module: the module whose ``named_parameters`` name the optimizer's parameters.
        layout: name mapping of the sharded layers.

    Raises:
        ValueError: if a parameter group holds some but not all of a layer's local expert modules.
    """

    def __init__(self, optimizer: Optimizer, module: nn.Module, layout: ShardLayout) -> None:
        names = {id(p): n for n, p in module.named_parameters()}
        self.layout = layout
        self.params: list[Tensor] = []
        self.local_names: list[str] = []
        self.group_sizes: list[int] = []
        self.logical_groups: list[list[str]] = []
        for group in optimizer.param_groups:
            local = []
            for p in group["params"]:
                local.append(names.get(id(p), f"<unnamed parameter {len(self.params)}>"))
                self.params.append(p)
            self.local_names += local
            self.group_sizes.append(len(local))
            self.logical_groups.append(self._logical_group(local))
        self.logical_index = {n: i for i, n in enumerate(n for g in self.logical_groups for n in g)}

    def _logical_group(self, local: list[str]) -> list[str]:
        rests: dict[str, list[str]] = {}
        held: dict[str, set] = {}
        for name in local:
            kind, shard, i, rest = self.layout.classify(name)
            if shard is not None and kind == TEMPLATE:
                if rest not in rests.setdefault(shard.prefix, []):
                    rests[shard.prefix].append(rest)
                held.setdefault(shard.prefix, set()).add((i, rest))
        logical, emitted = [], set()
        for name in local:
            kind, shard, i, rest = self.layout.classify(name)
            if shard is None or kind != TEMPLATE:
                logical.append(name)
                continue
            if shard.prefix in emitted:
                continue
            expected = {(j, r) for j in range(shard.num_local) for r in rests[shard.prefix]}
            if held[shard.prefix] != expected:
                raise ValueError(f"OptimizerLayout: a parameter group holds only some expert modules of "
                                 f"{shard.prefix[:-1]!r}; put every expert's parameters in the same groups")
            emitted.add(shard.prefix)
            logical += [self.layout.template_name(shard, g, r)
                        for g in range(shard.num_experts) for r in rests[shard.prefix]]
        return logical

    def param_groups(self, groups: list[dict], key=None) -> list[dict]:
        """``groups`` (an optimizer's) with ``params`` replaced by logical indices (or names: ``key=str``)."""
        out = []
        for group, logical in zip(groups, self.logical_groups, strict=True):
            ids = list(logical) if key is str else [self.logical_index[n] for n in logical]
            out.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return out


def local_optimizer_state(saved: Mapping[str, Any], olayout: OptimizerLayout) -> dict[str, Any]:
    """This rank's ``optimizer.state_dict()`` out of a logical one (full tensors or this rank's slices).

    Raises:
        ValueError: if the saved parameter groups do not match this optimizer's logical groups.
    """
    saved_groups = saved["param_groups"]
    sizes = [len(g) for g in olayout.logical_groups]
    if [len(g["params"]) for g in saved_groups] != sizes:
        raise ValueError(f"MoEStrategy: the checkpoint's optimizer has parameter groups of sizes "
                         f"{[len(g['params']) for g in saved_groups]} but this model's optimizer, unsharded, has "
                         f"{sizes}; resume with the same model and configure_optimizers")
    index_to_name = {idx: n for g, logical in zip(saved_groups, olayout.logical_groups, strict=True)
                     for idx, n in zip(g["params"], logical, strict=True)}
    by_name = {index_to_name[idx]: st for idx, st in saved["state"].items() if idx in index_to_name}
    layout = olayout.layout
    state: dict[int, dict[str, Any]] = {}
    for idx, name in enumerate(olayout.local_names):
        kind, shard, _, _ = layout.classify(name)
        key = layout.logical_name(name)
        if key not in by_name:
            continue
        st = dict(by_name[key])
        if shard is not None and kind == GROUPED:
            st = {k: _rows(v, shard) for k, v in st.items()}
        state[idx] = st
    groups, start = [], 0
    for group, size in zip(saved_groups, olayout.group_sizes, strict=True):
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + size))})
        start += size
    return {"state": state, "param_groups": groups}
