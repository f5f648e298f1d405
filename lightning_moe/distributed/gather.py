"""Gather the experts of an expert-parallel group along the expert dim.

Under expert parallelism rank ``r`` of a group of size ``P`` holds a contiguous slice of every
per-expert tensor (rows ``[r * L, (r + 1) * L)`` of a stacked bank, or the modules of its local
experts), so the full tensor is the group's slices concatenated in group-rank order. Unsharding a
layer, pruning it, gathering a compressed bank and writing a full checkpoint all do exactly that,
X, or a gather to
one rank for checkpoints, which only the writer needs).

Shape legend: L local rows (experts) per rank, P ranks in the group, ``*`` the other dims.
"""

from __future__ import annotations

from typing import overload

import torch.distributed as dist
from torch import Tensor


@overload
def gather_experts(tensor: Tensor, group: dist.ProcessGroup | None, *, stack: bool = False, dst: None = None
                   ) -> Tensor: ...


@overload
def gather_experts(tensor: Tensor, group: dist.ProcessGroup | None, *, stack: bool = False, dst: int
                   ) -> Tensor | None: ...


def gather_experts(tensor: Tensor, group: dist.ProcessGroup | None, *, stack: bool = False,
                   dst: int | None = None) -> Tensor | None:
    """Concatenate ``tensor`` of every rank of ``group`` along dim 0, in group-rank order (a collective).

    Args:
        tensor: this rank's slice ``[L, *]`` (same shape and dtype on every rank), detached first.
        group: the expert-parallel process group (None: the default group).
        stack: ``tensor`` belongs to one expert and has no expert dim (a template expert's weight,
            a 0-dim buffer): gather ``[P, *]`` instead, one entry per rank.
        dst: group rank that receives the result (the others get None); None: every rank receives.

    Returns:
        ``[P * L, *]`` (``[P, *]`` with ``stack``) on the device of ``tensor``; None on ranks other
        than ``dst``.

    Example::

        full_w1_EDH = gather_experts(bank.w1, group)                 # every rank
        full = gather_experts(bank.w1, group, dst=0)                 # group rank 0 only
    """
    part = tensor.detach().contiguous()
    if stack:
        part = part.unsqueeze(0)
    size, rows = dist.get_world_size(group), part.shape[0]
    if dst is not None and dist.get_rank(group) != dst:
        dist.gather(part, None, group=group, group_dst=dst)
        return None
    out = part.new_empty((size * rows, *part.shape[1:]))
    if dst is None:
        dist.all_gather_single(out, part, group=group)
    else:  # the rank-ordered slices of ``out`` are contiguous views: gather writes into them in place
        dist.gather(part, [out[r * rows:(r + 1) * rows] for r in range(size)], group=group, group_dst=dst)
    return out
