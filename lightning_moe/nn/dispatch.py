"""Expert dispatch: how the rows of one MoE forward reach their experts and come back.

:class:`~lightning_moe.MoE` sorts its kept token->expert assignments by global expert into one
buffer ``x_MD`` with ``kept_counts_E`` rows per expert, then makes two calls on its dispatcher:

1. ``plan = dispatcher.plan(kept_counts_E)``: everything the exchange needs, on the host (the one
   host sync of the layer: per-expert counts size the expert GEMMs and the all-to-all splits);
2. ``y_MD = dispatcher(x_MD, plan, experts)``: the expert outputs of those rows, in the same order.

:class:`LocalDispatcher` (the default) runs every expert here. It also offers the whole local data path in
one call, :meth:`LocalDispatcher.routed` (gather, experts, weighted combine): experts that implement
:class:`RoutedExperts` (:class:`~lightning_moe.nn.GroupedExperts`) then run it fused, expert by expert,
without the ``[M, D]`` buffers (``nn/ops``). The expert-parallel dispatcher
(:class:`~lightning_moe.distributed.ExpertParallelDispatcher`) and the planning-only one
(:class:`~lightning_moe.distributed.simulated.SimulatedExpertParallel`) implement the same protocol;
the strategy installs them from outside (``layer.expert_dispatcher``), the layer knows no process group.

Shape legend (the package's, see :mod:`lightning_moe.nn`): M rows this rank sends (its
kept assignments, grouped by global expert), R rows it receives, D model width, E global experts,
P ranks of the expert-parallel group (1 when local; also their index as the source of received
rows), L = E/P local experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_moe.nn.ops.combine import weighted_combine


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """The host counts of one dispatch: what this rank sends, what it receives, what each expert runs.

    Built by a dispatcher's ``plan`` and consumed by its ``__call__`` in the same forward.

    Attributes:
        send_counts: rows this rank sends per global expert ``[E]`` (``kept_counts_E`` on the host).
        input_splits: rows sent to each rank of the group ``[P]`` (sums to M).
        output_splits: rows received from each rank ``[P]`` (sums to R).
        local_counts: rows received per local expert ``[L]``, summed over sources: the expert GEMM sizes.
        received_counts_PL: device LongTensor ``[P, L]`` of rows per (source rank, local expert); it
            regroups the received source-major rows by local expert without another sync.
        received_counts: the same on the host, flattened source-major ``[P * L]`` (the segments an
            overlapped exchange runs its experts on, source by source).

    Example:
        >>> plan = DispatchPlan.from_counts([2, 0, 1, 3], [2, 0, 1, 3], torch.tensor([[2, 0, 1, 3]]))
        >>> plan.input_splits, plan.local_counts, plan.num_sent, plan.num_received
        ((6,), (2, 0, 1, 3), 6, 6)
    """

    send_counts: tuple[int, ...]
    input_splits: tuple[int, ...]
    output_splits: tuple[int, ...]
    local_counts: tuple[int, ...]
    received_counts_PL: Tensor
    received_counts: tuple[int, ...] = ()

    @classmethod
    def from_counts(cls, send_counts: Sequence[int], received_counts: Sequence[int],
                    received_counts_PL: Tensor) -> DispatchPlan:
        """Derive splits and per-expert counts from host counts.

        Args:
            send_counts: rows sent per global expert ``[E]``, experts of rank ``r`` in chunk ``r``.
            received_counts: ``received_counts_PL`` on the host, flattened source-major ``[P * L]``.
            received_counts_PL: the same counts on the device ``[P, L]``.

        Raises:
            ValueError: if the counts do not split into ``S`` ranks of ``L`` experts.
        """
        P, L = received_counts_PL.shape
        if len(send_counts) != P * L or len(received_counts) != P * L:
            raise ValueError(f"DispatchPlan: got {len(send_counts)} send and {len(received_counts)} received counts "
                             f"for {P} ranks of {L} local experts; pass one count per expert of the layer")
        send, recv = tuple(send_counts), tuple(received_counts)
        if P == 1:  # local: keep the per-forward Python cost to a few microseconds
            return cls(send, (sum(send),), (sum(recv),), recv, received_counts_PL, recv)
        return cls(
            send_counts=send,
            input_splits=tuple(sum(send[r * L:(r + 1) * L]) for r in range(P)),
            output_splits=tuple(sum(recv[s * L:(s + 1) * L]) for s in range(P)),
            local_counts=tuple(sum(recv[s * L + e] for s in range(P)) for e in range(L)),
            received_counts_PL=received_counts_PL,
            received_counts=recv,
        )

    @property
    def num_sent(self) -> int:
        """M: rows this rank sends (its kept assignments)."""
        return sum(self.input_splits)

    @property
    def num_received(self) -> int:
        """R: rows this rank's experts run on."""
        return sum(self.output_splits)


@runtime_checkable
class ExpertDispatcher(Protocol):
    """How an :class:`~lightning_moe.MoE` layer runs its experts on rows grouped by global expert.

    Implementations: :class:`LocalDispatcher` (default, every expert here),
    :class:`~lightning_moe.distributed.ExpertParallelDispatcher` (experts sharded over a process
    group) and :class:`~lightning_moe.distributed.simulated.SimulatedExpertParallel` (one rank of such
    a group, peers mirrored, for planning). Every rank of a group must call ``plan`` and ``__call__``
    once per layer forward, whatever it holds, and get back rows of :func:`expert_output_dtype`.

    Example:
        >>> from lightning_moe.nn.experts import GroupedExperts
        >>> dispatcher, experts = LocalDispatcher(), GroupedExperts(2, dim=4, hidden_dim=8)
        >>> plan = dispatcher.plan(torch.tensor([3, 1]))  # rows per expert, grouped by expert
        >>> dispatcher(torch.randn(4, 4), plan, experts).shape
        torch.Size([4, 4])
    """

    def plan(self, kept_counts_E: Tensor, host_counts: Sequence[int] | None = None) -> DispatchPlan:
        """Plan one dispatch of ``kept_counts_E`` rows per global expert.

        Args:
            kept_counts_E: LongTensor ``[E]`` on the layer's device.
            host_counts: the same counts when the caller already knows them on the host (expert
                choice: its fixed capacities); a dispatcher then skips syncing them.
        """
        ...

    def __call__(self, x_MD: Tensor, plan: DispatchPlan, experts: nn.Module) -> Tensor:
        """Run ``experts`` on ``x_MD`` (grouped by global expert as planned); returns ``y_MD`` in that order."""
        ...


@runtime_checkable
class RoutedExperts(Protocol):
    """Experts that gather their rows, run and combine them back per token in one call (the local fast path).

    ``forward_routed(x_TD, token_N, weights_N, counts)`` must equal
    ``weighted_combine(experts(x_TD[token_M], counts), weights_M, token_M, T)`` over the first
    ``M = sum(counts)`` rows, ``counts`` a LongTensor or host ints.
    """

    def forward_routed(self, x_TD: Tensor, token_N: Tensor, weights_N: Tensor,
                       counts: Tensor | Sequence[int]) -> Tensor:
        ...


class LocalDispatcher:
    """The default dispatcher: this process holds every expert; no exchange.

    Example:
        >>> from lightning_moe.nn.experts import GroupedExperts
        >>> plan = LocalDispatcher().plan(torch.tensor([1, 0, 2]))
        >>> plan.local_counts, LocalDispatcher()(torch.randn(3, 4), plan, GroupedExperts(3, 4, 8)).shape
        ((1, 0, 2), torch.Size([3, 4]))
    """

    def plan(self, kept_counts_E: Tensor, host_counts: Sequence[int] | None = None) -> DispatchPlan:
        # NOTE: host sync (skipped when the caller knows the counts): the expert GEMMs need their sizes.
        counts = list(host_counts) if host_counts is not None else kept_counts_E.tolist()
        return DispatchPlan.from_counts(counts, counts, kept_counts_E.view(1, -1))

    def __call__(self, x_MD: Tensor, plan: DispatchPlan, experts: nn.Module) -> Tensor:
        return experts(x_MD, plan.local_counts)

    def routed(self, x_TD: Tensor, token_N: Tensor, weights_N: Tensor, kept_counts_E: Tensor, experts: nn.Module,
               host_counts: Sequence[int] | None = None) -> Tensor:
        """The local data path in one call: rows ``token_N`` through ``experts``, weighted back per token.

        Args:
            x_TD: tokens.
            token_N: token of each assignment, kept ones first grouped by expert (``kept_counts_E[e]`` for
                expert ``e``), dropped ones after them (ignored).
            weights_N: routing weight of each assignment.
            kept_counts_E: LongTensor ``[E]`` of kept rows per expert.
            experts: the layer's experts; :class:`RoutedExperts` run it fused.
            host_counts: ``kept_counts_E`` on the host when the caller knows it (no sync then).

        Returns:
            ``out_TD``: per token the weighted sum of its kept rows' expert outputs.
        """
        if isinstance(experts, RoutedExperts):
            # The experts read the counts on the host themselves (the layer's one sync; under torch.compile
            # inside a custom operator, so without a graph break).
            return experts.forward_routed(x_TD, token_N, weights_N,
                                          host_counts if host_counts is not None else kept_counts_E)
        plan = self.plan(kept_counts_E, host_counts)
        token_M, weights_M = token_N[: plan.num_sent], weights_N[: plan.num_sent]
        return weighted_combine(self(x_TD.index_select(0, token_M), plan, experts), weights_M, token_M,
                                x_TD.shape[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def expert_output_dtype(x_MD: Tensor) -> torch.dtype:
    """The dtype expert GEMMs give for input ``x_MD``, decided without looking at any data.

    The autocast dtype when autocast is on for ``x_MD``'s device (autocast leaves float64 alone),
    otherwise ``x_MD``'s dtype. Every rank of a group computes the same answer, so rows exchanged
    between ranks agree on their dtype even where a rank ran no expert.
    """
    device_type = x_MD.device.type
    if torch.is_autocast_enabled(device_type) and x_MD.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x_MD.dtype


__all__ = ["DispatchPlan", "ExpertDispatcher", "LocalDispatcher", "RoutedExperts", "expert_output_dtype"]
