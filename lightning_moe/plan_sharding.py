"""How FSDP2 shards a planned model, tensor by tensor, as ``MoEStrategy(data_parallel="fsdp")`` does (stdlib only).

The capacity planner (:mod:`lightning_moe.plan`) counts a rank's bytes with ``"fsdp"`` sharding from these:
:func:`fsdp_shard_numel` (the elements a rank keeps of a non-expert tensor) and :func:`unit_sizes` (each FSDP
unit's unsharded size and the size of its padded storage, for the units in flight at the peak).
"""

from __future__ import annotations

from lightning_moe.architecture import Architecture, tensor_shapes

__all__ = ["fsdp_shard_numel", "unit_sizes"]


def _fsdp_dim(shape: tuple[int, ...], world: int) -> int:
    return 1 if len(shape) > 1 and shape[0] < world and shape[1] % world == 0 else 0


def fsdp_shard_numel(shape: tuple[int, ...], world: int, rank: int) -> int:
    """Elements of a tensor of ``shape`` that FSDP2 leaves on ``rank`` of ``world`` (a non-expert tensor).

    The strategy's rule (:mod:`lightning_moe.distributed.fsdp`): dim 0, or dim 1 when dim 0 has fewer rows than
    ranks and dim 1 divides evenly (a stacked shared expert ``[1, D, H]``); ``torch.chunk`` semantics, so rank
    ``r`` holds rows ``[r*c, (r+1)*c)`` of ``c = ceil(n / world)`` (none past the end).

    Example:
        >>> fsdp_shard_numel((10, 3), world=4, rank=0), fsdp_shard_numel((10, 3), world=4, rank=3)
        (9, 3)
    """
    if not shape:
        return 1 if rank == 0 else 0
    dim = _fsdp_dim(shape, world)
    n = shape[dim]
    chunk = -(-n // world)
    rows = max(0, min(chunk, n - rank * chunk))
    rest = 1
    for i, size in enumerate(shape):
        rest *= size if i != dim else 1
    return rows * rest


def unit_sizes(arch: Architecture, ep: int, gpus: int) -> dict[str, list[int]]:
    """``{unit: [numel, padded numel]}`` of the FSDP units: the root (``""``) and each block (``"blocks.i"``).

    A block counts this rank's ``experts / ep`` routed experts (sharded evenly over their data ranks); a
    non-expert tensor sharded on dim 0 is stored padded to ``gpus * ceil(n / gpus)`` rows when unsharded.
    """
    local = arch.experts // ep
    sizes: dict[str, list[int]] = {}
    for name, shape, routed in tensor_shapes(arch):
        unit = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else ""
        numel = 1
        for size in shape[1:]:
            numel *= size
        if routed:  # this rank's experts, sharded evenly over dp
            numel, padded = numel * local, numel * local
        elif shape and _fsdp_dim(shape, gpus) == 0:
            padded = numel * gpus * -(-shape[0] // gpus)
            numel *= shape[0]
        else:  # sharded evenly on dim 1
            numel *= shape[0] if shape else 1
            padded = numel
        totals = sizes.setdefault(unit, [0, 0])
        totals[0] += numel
        totals[1] += padded
    return sizes
