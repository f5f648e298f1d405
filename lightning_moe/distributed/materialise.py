"""Materialise a model built on the meta device, shard by shard, with an init that does not depend on the world size.

A model built under ``torch.device("meta")`` costs no memory at any size. The strategy (or the dry run) first
shards it on meta, expert parallelism keeping only this rank's experts and FSDP2 turning parameters into
``DTensor`` shards, then calls :func:`materialise`: every rank allocates only what it holds and fills it so that
the *logical* model is the same at any world size, for one seed:

* expert ``g`` of the expert bank at path ``p`` draws from ``(seed, p, g)`` (global id, through
  ``GroupedExperts.reset_parameters(seed=...)`` / ``TemplateExperts.reset_parameters(seed=...)``);
* every other module with ``reset_parameters`` draws from ``(seed, its path)``;
* buffers (routing stats, ``expert_bias``) start at zero, as in a freshly built :class:`~lightning_moe.MoE`.

A module whose parameters are FSDP2 shards is initialised on a temporary full copy of its own parameters (one
module at a time, so the extra memory is that module's unsharded size), and each rank keeps its slice
(``distribute_tensor(..., src_data_rank=None)``: a local split, no communication).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.nn.experts import GroupedExperts, TemplateExperts

__all__ = ["has_meta_tensors", "materialise", "seed_for"]


def seed_for(seed: int, name: str) -> int:
    """The seed of the tensor or module at path ``name`` for the base ``seed`` (stable across processes)."""
    return zlib.crc32(f"{seed}/{name}".encode())


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device (needs :func:`materialise`)."""
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def _init_on_full_copies(module: nn.Module, recurse: bool, init: Callable[[], None]) -> None:
    """Run ``init`` (which fills ``module``'s parameters) on full copies of its sharded ones, keep each rank's part.

    Parameters that are plain tensors are initialised in place; a ``DTensor`` parameter is swapped for a full
    tensor of its logical shape for the duration of ``init``, then this rank's shard is copied out of it.
    """
    from torch.distributed.tensor import distribute_tensor

    owners = module.modules() if recurse else [module]
    swapped: list[tuple[nn.Module, str, Any]] = [(owner, name, p) for owner in owners
                                                 for name, p in owner.named_parameters(recurse=False) if _is_dtensor(p)]
    temps = []
    for owner, name, p in swapped:
        full = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)
        setattr(owner, name, nn.Parameter(full, requires_grad=p.requires_grad))
        temps.append(full)
    try:
        init()
    finally:
        for (owner, name, p), full in zip(swapped, temps, strict=True):
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
            setattr(owner, name, p)


@torch.no_grad()
def materialise(model: nn.Module, seed: int = 0, device: torch.device | str = "cpu") -> int:
    """Allocate ``model`` (built on meta; whole, expert-sharded or FSDP2-sharded) on ``device`` and initialise it.

    Each rank allocates only the tensors (or ``DTensor`` shards) it holds, and its values equal the matching
    slice of the whole model materialised in one process with the same ``seed``.

    Args:
        model: The model, its parameters on the meta device.
        seed: Base seed, the same on every rank.
        device: Target device.

    Returns:
        Number of (logical) parameters materialised.

    Raises:
        ValueError: If a parameter belongs to a module without ``reset_parameters`` (its values would be
            undefined); give that module a ``reset_parameters`` or build the model on a real device.

    Example:
        >>> with torch.device("meta"):
        ...     layer = nn.Linear(4, 2)
        >>> materialise(layer, seed=1), layer.weight.device.type
        (10, 'cpu')
    """
    # to_empty gives every module a new Parameter on another device, untying shared ones (tied embeddings).
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (module, name), *others in owners.values():
        for other, other_name in others:
            if not _is_dtensor(getattr(module, name)):
                setattr(other, other_name, getattr(module, name))
    covered: set[int] = set()
    banks: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in banks):
            continue  # inside an expert bank: seeded by global expert id with the bank
        if isinstance(module, (GroupedExperts, TemplateExperts)):
            banks.append(f"{name}.")
            bank: Any = module

            def reset_bank(bank: Any = bank, name: str = name) -> None:
                bank.reset_parameters(seed=seed_for(seed, name))

            _init_on_full_copies(bank, True, reset_bank)
            covered |= {id(p) for p in bank.parameters()}
        elif callable(getattr(module, "reset_parameters", None)):
            def reset(module: Any = module, name: str = name) -> None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed_for(seed, name))
                    module.reset_parameters()

            _init_on_full_copies(module, False, reset)
            covered |= {id(p) for p in module.parameters(recurse=False)}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"materialise: parameters {missing[:3]} belong to modules without reset_parameters(), so "
                         "built on meta they have no defined values; give those modules a reset_parameters() or "
                         "build the model on a real device")
    for buffer in model.buffers():
        buffer.zero_()
    return sum(p.numel() for p in model.parameters())
