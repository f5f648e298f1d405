"""Autograd-aware all-to-all for expert parallelism.

Tokens travel with :func:`all_to_all`, a thin wrapper over torch's functional collective
``all_to_all_single_autograd``: its backward is the reverse all-to-all (split sizes swapped), so
gradients of expert outputs flow back to the rank that owns each token. Counts travel with
:func:`all_to_all_counts`, which has no autograd (integers). We never implement communication
ourselves; both calls work with uneven splits on gloo (CPU) and NCCL (CUDA).

Shape legend: M rows sent by this rank, R rows received, D feature width, E global experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_moe._compat import funcol


def all_to_all(
    x_MD: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group: dist.ProcessGroup | None
) -> Tensor:
    """Differentiable uneven all-to-all along dim 0.

    Rows ``x_MD[sum(input_splits[:r]) : sum(input_splits[:r + 1])]`` go to rank ``r`` of ``group``;
    the result concatenates what every rank sent here, in rank order.

    Args:
        x_MD: rows to send, grouped by destination rank.
        output_splits: rows to receive from each rank of ``group`` (length = group size).
        input_splits: rows to send to each rank of ``group`` (length = group size, sums to ``M``).
        group: the expert-parallel process group (None: the default group).

    Returns:
        ``x_RD`` with ``R = sum(output_splits)``; its gradient flows back through the reverse all-to-all.

    Raises:
        ValueError: if the split lists do not match the group size or ``x_MD``'s length.
    """
    size = dist.get_world_size(group)
    if len(output_splits) != size or len(input_splits) != size:
        raise ValueError(f"all_to_all: got {len(input_splits)} input and {len(output_splits)} output splits "
                         f"for a group of {size} ranks; pass one split per rank")
    if sum(input_splits) != x_MD.shape[0]:
        raise ValueError(f"all_to_all: input_splits sum to {sum(input_splits)} but x has {x_MD.shape[0]} rows")
    # The functional collective takes no None: resolve the default group (get_world_size raised if there is none).
    pg = cast(dist.ProcessGroup, group if group is not None else dist.group.WORLD)
    out = funcol.all_to_all_single_autograd(
        x_MD.contiguous(), [int(s) for s in output_splits], [int(s) for s in input_splits], pg
    )
    # The functional collective returns a lazily-waited tensor; wait here so callers get a plain
    # tensor (the wait's backward is the identity, the collective's backward the reverse all-to-all).
    return funcol.wait_tensor(out)


@torch.no_grad()
def all_to_all_counts(send_counts: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Exchange equal-sized chunks of an integer vector (no autograd).

    Args:
        send_counts: 1-D tensor whose length is a multiple of the group size; chunk ``r`` goes to rank ``r``.
        group: the expert-parallel process group (None: the default group).

    Returns:
        Tensor of the same shape: chunk ``s`` is what rank ``s`` sent to this rank.
    """
    size = dist.get_world_size(group)
    if send_counts.ndim != 1 or send_counts.numel() % size:
        raise ValueError(f"all_to_all_counts: send_counts of shape {tuple(send_counts.shape)} must be 1-D with a "
                         f"length that is a multiple of the group size {size}")
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


def all_to_all_start(x_MD: Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                     group: dist.ProcessGroup | None) -> Tensor:
    """Start an uneven all-to-all without autograd; :func:`all_to_all_wait` on the result waits for it.

    What the caller computes in between overlaps the exchange (an expert-parallel layer runs the experts on
    the rows it keeps while the others travel). Arguments as for :func:`all_to_all`.
    """
    pg = cast(dist.ProcessGroup, group if group is not None else dist.group.WORLD)
    with torch.no_grad():
        return funcol.all_to_all_single(x_MD.contiguous(), [int(s) for s in output_splits],
                                        [int(s) for s in input_splits], pg)


def all_to_all_wait(started: Tensor) -> Tensor:
    """The result of :func:`all_to_all_start`, once it arrived (a plain tensor)."""
    return funcol.wait_tensor(started)
