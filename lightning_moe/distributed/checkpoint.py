"""Checkpoints of the full logical model under expert parallelism.

A sharded rank names its tensors locally: ``layer.experts.w1`` holds rows ``[lo, hi)`` of the
stacked experts, ``layer.experts.experts.0.weight`` is global expert ``lo``. Checkpoints always use
the *logical* names and shapes, those of the same model holding every expert in one process, so
they load in a plain process and reshard at any expert-parallel size.

- Full (one file): rank 0 gathers every expert tensor, and every expert's optimizer state, over its
  expert-parallel group; the optimizer state is indexed exactly as an unsharded model's optimizer
  would index it. Loading slices this rank's experts out.
- Sharded (a torch.distributed.checkpoint directory): stacked experts are DTensors over the
  ``("data", "expert")`` mesh (``Replicate`` x ``Shard(0)``), per-module experts plain tensors under
  their global names written by their owners; flat keys ``model/<name>`` and
  ``optim<j>/<name>/<state key>``; everything else goes to ``meta.pt`` on rank 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_moe.distributed.expert_parallel import ExpertShard

META_FILENAME = "meta.pt"
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
        """``(kind, shard, local expert index, rest of the name)`` of a local state-dict name."""
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
        return self.template_name(shard, shard.offset + local, rest) if kind == TEMPLATE else name


def _gather(tensor: Tensor, group: dist.ProcessGroup, is_dst: bool, device: torch.device) -> list[Tensor] | None:
    """Gather equal-shaped tensors from every rank of ``group`` to its rank 0 (through ``device``), to the CPU."""
    tensor = tensor.detach().to(device).contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))] if is_dst else None
    dist.gather(tensor, parts, dst=dist.get_global_rank(group, 0), group=group)
    return [p.cpu() for p in parts] if is_dst else None


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
        parts = _gather(tensor, group, is_dst, device)
        if not is_dst:
            continue
        if kind == GROUPED:
            gathered[name] = torch.cat(parts)
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
        kind, shard, local, rest = layout.classify(name)
        key = layout.template_name(shard, shard.offset + local, rest) if kind == TEMPLATE else name
        if key not in state:
            continue
        consumed.add(key)
        value = state[key]
        if kind == GROUPED:
            value = _rows(value, shard)
        out[name] = value
    for key, value in state.items():
        if key not in consumed and layout.classify(key)[0] == DENSE:
            out[key] = value
    return out


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
            if kind == TEMPLATE:
                if rest not in rests.setdefault(shard.prefix, []):
                    rests[shard.prefix].append(rest)
                held.setdefault(shard.prefix, set()).add((i, rest))
        logical, emitted = [], set()
        for name in local:
            kind, shard, i, rest = self.layout.classify(name)
            if kind != TEMPLATE:
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
        per_expert: list[dict[str, Any]] = [{} for _ in range(shard.ep_size)]
        for key in sorted(state[idx]):
            value = state[idx][key]
            is_row_state = isinstance(value, Tensor) and value.shape == param.shape
            parts = _gather(value, group, is_dst, device) if is_row_state else [value] * shard.ep_size
            if is_dst:
                for r in range(shard.ep_size):
                    per_expert[r][key] = parts[r]
        if not is_dst:
            continue
        if kind == GROUPED:
            out_state[olayout.logical_index[name]] = {
                k: torch.cat([per_expert[r][k] for r in range(shard.ep_size)])
                if isinstance(v, Tensor) and v.shape == param.shape else v
                for k, v in per_expert[0].items()
            }
        else:
            for r in range(shard.ep_size):
                logical = layout.template_name(shard, r * shard.num_local + i, rest)
                out_state[olayout.logical_index[logical]] = per_expert[r]
    if not is_dst:
        return local
    return {"state": dict(sorted(out_state.items())), "param_groups": olayout.param_groups(local["param_groups"])}


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
        kind, shard, i, rest = layout.classify(name)
        key = layout.template_name(shard, shard.offset + i, rest) if kind == TEMPLATE else name
        if key not in by_name:
            continue
        st = dict(by_name[key])
        if kind == GROUPED:
            st = {k: _rows(v, shard) for k, v in st.items()}
        state[idx] = st
    groups, start = [], 0
    for group, size in zip(saved_groups, olayout.group_sizes, strict=True):
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + size))})
        start += size
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# Sharded (torch.distributed.checkpoint) format


def _expert_placements():
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate(), Shard(0)]  # mesh dims ("data", "expert")


def _dtensor(local: Tensor, shard: ExpertShard, mesh) -> Tensor:
    from torch.distributed.tensor import DTensor

    shape = torch.Size([shard.num_experts, *local.shape[1:]])
    return DTensor.from_local(local.contiguous(), mesh, _expert_placements(), run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def sharded_model_state(state: Mapping[str, Tensor], layout: ShardLayout, mesh) -> dict[str, Tensor]:
    """Logical names, stacked experts as DTensors over ``mesh``, per-module experts under global names."""
    out = {}
    for name, tensor in state.items():
        kind, shard, _, _ = layout.classify(name)
        out[layout.logical_name(name)] = _dtensor(tensor, shard, mesh) if kind == GROUPED else tensor
    return out


def sharded_optimizer_state(optimizer: Optimizer, olayout: OptimizerLayout, mesh) -> dict[str, Any]:
    """``{"state": {logical name: {key: tensor | DTensor}}, "param_groups": [... names ...]}`` of this rank."""
    local = optimizer.state_dict()
    layout = olayout.layout
    state = {}
    for idx, st in local["state"].items():
        name = olayout.local_names[idx]
        kind, shard, _, _ = layout.classify(name)
        param = olayout.params[idx]
        state[layout.logical_name(name)] = {
            k: _dtensor(v, shard, mesh) if kind == GROUPED and isinstance(v, Tensor) and v.shape == param.shape else v
            for k, v in st.items()
        }
    return {"state": state, "param_groups": olayout.param_groups(local["param_groups"], key=str)}


def save_sharded(checkpoint: dict[str, Any], path: Path, is_global_zero: bool) -> None:
    """Write ``checkpoint`` (from :func:`sharded_model_state` / :func:`sharded_optimizer_state`) as a DCP directory.

    Collective over the default process group: every rank writes its shards.
    """
    import torch.distributed.checkpoint as dcp

    checkpoint = dict(checkpoint)
    flat: dict[str, Any] = {f"model/{k}": v for k, v in checkpoint.pop("state_dict").items()}
    optimizers = checkpoint.pop("optimizer_states", [])
    extras = []
    for j, opt in enumerate(optimizers):
        extra: dict[str, dict[str, Any]] = {}
        for name, st in opt["state"].items():
            for key, value in st.items():
                if isinstance(value, Tensor):
                    flat[f"optim{j}/{name}/{key}"] = value
                else:
                    extra.setdefault(name, {})[key] = value
        extras.append({"param_groups": opt["param_groups"], "extra_state": extra})
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(flat, checkpoint_id=str(path))
    if is_global_zero:
        checkpoint["moe_optimizer_states"] = extras
        torch.save(checkpoint, path / META_FILENAME)


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILENAME).is_file()


def _optimizer_states_from_flat(flat: Mapping[str, Any], meta_optimizers: list[dict]) -> list[dict[str, Any]]:
    """Name-keyed (flat DCP) optimizer states -> ``optimizer.state_dict()`` format, logical indices."""
    states = []
    for j, meta in enumerate(meta_optimizers):
        names = [n for g in meta["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(names)}
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim{j}/"
        for key, value in flat.items():
            if key.startswith(prefix):
                name, state_key = key[len(prefix):].rsplit("/", 1)
                state.setdefault(index[name], {})[state_key] = value.to_local() if _is_dtensor(value) else value
        for name, extra in meta["extra_state"].items():
            state.setdefault(index[name], {}).update(extra)
        groups, start = [], 0
        for g in meta["param_groups"]:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        states.append({"state": dict(sorted(state.items())), "param_groups": groups})
    return states


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def load_sharded(path: Path, local_state: Mapping[str, Tensor], olayouts: list[OptimizerLayout], layout: ShardLayout,
                 mesh, weights_only: bool | None = None) -> dict[str, Any]:
    """Read a DCP directory into this rank's slices; collective over the default process group.

    Args:
        path: the checkpoint directory.
        local_state: the module's current (local) state dict: which logical entries this rank reads.
        olayouts: layouts of the current optimizers (which optimizer entries this rank reads).
        layout: name mapping of the sharded layers.
        mesh: the current ``("data", "expert")`` mesh (None when nothing is sharded).
        weights_only: passed to ``torch.load`` for ``meta.pt``.

    Returns:
        A Lightning checkpoint dict: ``state_dict`` with logical names (experts: this rank's rows or
        global ids only), ``optimizer_states`` in logical-index format, plus everything in ``meta.pt``.
    """
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    meta = torch.load(path / META_FILENAME, weights_only=True if weights_only is None else weights_only)
    meta_optimizers = meta.pop("moe_optimizer_states", [])
    template: dict[str, Any] = {}

    def wanted(key: str, kind: str, shard: ExpertShard | None, like: Tensor | None) -> None:
        md = metadata.get(key)
        if md is None or not hasattr(md, "size"):
            return
        dtype = md.properties.dtype
        size = torch.Size(md.size)
        if kind == GROUPED and like is not None and len(size) and size[0] == shard.num_experts and mesh is not None:
            local = torch.empty((shard.num_local, *size[1:]), dtype=dtype, device=like.device)
            template[key] = _dtensor(local, shard, mesh)
        else:
            template[key] = torch.empty(size, dtype=dtype, device=like.device if like is not None else "cpu")

    for name, tensor in local_state.items():
        kind, shard, _, _ = layout.classify(name)
        wanted(f"model/{layout.logical_name(name)}", kind, shard, tensor)
    keys_by_name: dict[tuple[int, str], list[str]] = {}
    for key in metadata:
        if key.startswith("optim"):
            j, rest = key[len("optim"):].split("/", 1)
            name, _ = rest.rsplit("/", 1)
            keys_by_name.setdefault((int(j), name), []).append(key)
    for j, olayout in enumerate(olayouts):
        for idx, name in enumerate(olayout.local_names):
            kind, shard, _, _ = layout.classify(name)
            for key in keys_by_name.get((j, layout.logical_name(name)), []):
                wanted(key, kind, shard, olayout.params[idx])
    dcp.load(template, checkpoint_id=str(path))

    state_dict = {k[len("model/"):]: v.to_local() if _is_dtensor(v) else v
                  for k, v in template.items() if k.startswith("model/")}
    return {**meta, "state_dict": state_dict,
            "optimizer_states": _optimizer_states_from_flat(template, meta_optimizers)}


def consolidate_checkpoint(path: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Turn a sharded (DCP) checkpoint directory into a full one, in a single process (no process group).

    Args:
        path: the directory written with ``MoEStrategy(checkpoint="sharded")``.
        output: where to ``torch.save`` the result (optional). It then loads with
            ``MyModel.load_from_checkpoint(output)`` and resumes under any strategy.

    Returns:
        The full Lightning checkpoint dict (logical names and shapes, optimizer states indexed as
        for the unsharded model).

    Example::

        python -c "from lightning_moe.strategy import consolidate_checkpoint as c; c('last.ckpt', 'last.full.ckpt')"
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"consolidate_checkpoint: path={str(path)!r} must be a directory written with "
                         f"MoEStrategy(checkpoint='sharded') (holding {META_FILENAME})")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    template = {k: torch.empty(torch.Size(md.size), dtype=md.properties.dtype)
                for k, md in metadata.items() if hasattr(md, "size")}
    dcp.load(template, checkpoint_id=str(path), no_dist=True)
    meta = torch.load(path / META_FILENAME, weights_only=True)
    meta_optimizers = meta.pop("moe_optimizer_states", [])
    checkpoint = {**meta, "state_dict": {k[len("model/"):]: v for k, v in template.items() if k.startswith("model/")},
                  "optimizer_states": _optimizer_states_from_flat(template, meta_optimizers)}
    if output is not None:
        torch.save(checkpoint, output)
    return checkpoint
