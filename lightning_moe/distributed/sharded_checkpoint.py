"""The sharded checkpoint format: a torch.distributed.checkpoint (DCP) directory, each rank writing its shards.

Stacked experts are DTensors over the ``("data", "expert")`` mesh (``Replicate`` x ``Shard(0)``),
per-module experts plain tensors under their global names written by their owners; flat keys
``model/<name>`` and ``optim<j>/<name>/<state key>``; everything else goes to ``meta.pt`` on rank 0.
Names and shapes are the logical ones (:mod:`~lightning_moe.distributed.shard_layout`), so a
directory reshards on resume at any expert-parallel size, and :func:`consolidate_checkpoint` turns
it into a full file in a single process.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_moe.distributed.expert_parallel import ExpertShard
from lightning_moe.distributed.shard_layout import GROUPED, OptimizerLayout, ShardLayout, is_per_expert

META_FILENAME = "meta.pt"


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
        stacked = shard if kind == GROUPED else None
        out[layout.logical_name(name)] = _dtensor(tensor, stacked, mesh) if stacked is not None else tensor
    return out


def sharded_optimizer_state(optimizer: Optimizer, olayout: OptimizerLayout, mesh) -> dict[str, Any]:
    """``{"state": {logical name: {key: tensor | DTensor}}, "param_groups": [... names ...]}`` of this rank."""
    local = optimizer.state_dict()
    layout = olayout.layout
    state = {}
    for idx, st in local["state"].items():
        name = olayout.local_names[idx]
        kind, shard, _, _ = layout.classify(name)
        stacked = shard if kind == GROUPED else None
        state[layout.logical_name(name)] = {  # per-expert rows (factored states too) shard with the experts
            k: _dtensor(v, stacked, mesh) if stacked is not None and is_per_expert(v, stacked.num_local) else v
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


def saved_model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every model tensor in a DCP directory (logical names), read from its metadata only."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len("model/"):]: tuple(md.size) for k, md in metadata.items()
            if k.startswith("model/") and hasattr(md, "size")}


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
        if not isinstance(md, dcp.TensorStorageMetadata):  # absent, or bytes
            return
        dtype = md.properties.dtype
        size = torch.Size(md.size)
        if (shard is not None and kind == GROUPED and like is not None and len(size) and size[0] == shard.num_experts
                and mesh is not None):
            local = torch.empty((shard.num_local, *size[1:]), dtype=dtype, device=like.device)
            template[key] = _dtensor(local, shard, mesh)
        elif like is None or (key.startswith("optim") and not len(size)):
            # A 0-dim optimizer state (Adam's step) stays on the CPU, where torch keeps it unless the optimizer
            # is capturable or fused (its load_state_dict then moves it to the parameter's device itself).
            template[key] = torch.empty(size, dtype=dtype, device="cpu")
        else:
            template[key] = torch.empty(size, dtype=dtype, device=like.device)

    for name, tensor in local_state.items():
        kind, shard, _, _ = layout.classify(name)
        wanted(f"model/{layout.logical_name(name)}", kind, shard, tensor)
    keys_by_name: dict[tuple[int, str], list[str]] = {}
    for key in metadata:
        if key.startswith("optim"):
            index, rest = key[len("optim"):].split("/", 1)
            name, _ = rest.rsplit("/", 1)
            keys_by_name.setdefault((int(index), name), []).append(key)
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

    With ``output``, the file is written tensor by tensor: first its layout (``torch.save`` under
    ``torch.serialization.skip_data``: every record sized, no bytes written from memory), then the file is mapped
    (``torch.load(mmap=True)`` with ``MAP_SHARED``) and each tensor is read from the directory straight into its
    place in the file, one ``torch.distributed.checkpoint.load`` per tensor. Memory holds one tensor at a time
    on top of the file's pages, whatever the model's size.

    Args:
        path: the directory written with ``MoEStrategy(checkpoint="sharded")`` (``data_parallel`` ``"ddp"`` or
            ``"fsdp"``).
        output: where to write the full file (optional). It then loads with
            ``MyModel.load_from_checkpoint(output, weights_only=True)`` and resumes under any strategy.

    Returns:
        The full Lightning checkpoint dict (logical names and shapes, optimizer states indexed as for the unsharded
        model): with ``output``, its tensors map the file (``mmap``), without, they are in memory.

    Example::

        python -c "from lightning_moe.strategy import consolidate_checkpoint as c; c('last.ckpt', 'last.full.ckpt')"
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"consolidate_checkpoint: path={str(path)!r} must be a directory written with "
                         f"MoEStrategy(checkpoint='sharded') (holding {META_FILENAME})")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # NOTE: torch.empty reserves address space only; the pages are touched where a tensor is filled.
    template = {k: torch.empty(torch.Size(md.size), dtype=md.properties.dtype)
                for k, md in metadata.items() if isinstance(md, dcp.TensorStorageMetadata)}
    meta = torch.load(path / META_FILENAME, weights_only=True)
    meta_optimizers = meta.pop("moe_optimizer_states", [])
    checkpoint = {**meta, "state_dict": {k[len("model/"):]: v for k, v in template.items() if k.startswith("model/")},
                  "optimizer_states": _optimizer_states_from_flat(template, meta_optimizers)}
    if output is None:
        dcp.load(template, checkpoint_id=str(path), no_dist=True)
        return checkpoint
    with torch.serialization.skip_data():
        torch.save(checkpoint, output)
    key_of = {id(t): k for k, t in template.items()}
    # Each tensor of the file: its DCP key, or (small tensors of meta.pt, not written under skip_data) its value.
    sources = [key_of.get(id(t), t) for t, _ in _tensor_pairs(checkpoint, checkpoint)]
    del template, checkpoint
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(output, mmap=True, weights_only=True)
    for source, (_, tensor) in zip(sources, _tensor_pairs(mapped, mapped), strict=True):
        if isinstance(source, str):
            dcp.load({source: tensor}, checkpoint_id=str(path), no_dist=True)  # into the file's pages
        else:
            tensor.copy_(source)
    del mapped
    return torch.load(output, mmap=True, weights_only=True)


def _tensor_pairs(a: Any, b: Any):
    """``(x, y)`` for every tensor ``x`` of ``a`` and the tensor ``y`` at the same place in ``b`` (same structure)."""
    if isinstance(a, Tensor):
        yield a, b
    elif isinstance(a, dict):
        for key in a:
            yield from _tensor_pairs(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            yield from _tensor_pairs(x, y)
