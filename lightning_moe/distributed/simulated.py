"""One expert-parallel rank in one process: the EP dispatcher with its peers simulated (planning only).

:class:`SimulatedExpertParallel` is a ``layer.expert_dispatcher`` that plays EP rank ``r`` of a group of
``P`` ranks without any process group. It runs the sequence of
:class:`~lightning_moe.distributed.ExpertParallelDispatcher` (both are
:class:`~lightning_moe.distributed.expert_parallel.ShardedDispatcher`: counts, token all-to-all, regroup by
local expert, local experts, inverse regroup, all-to-all back) with each all-to-all replaced by a
*mirrored* one, so that this process allocates, computes and "communicates" what a real rank of a balanced
job does.

The simulated world (peers are rotated copies of this rank). Every peer ``s`` is assumed to route its tokens
like rank ``r`` does, with expert ids shifted by its position. Then the rows peer ``s`` sends to rank ``r``
are exactly rank ``r``'s own rows bound for the experts of rank ``m(s) = (2r - s) mod P``, with the same
local-expert split. ``m`` is an involution (``m(m(s)) = s``, ``m(r) = r``), so one block permutation is
both the dispatch and the combine all-to-all, and its own backward.

What is real:
    * this rank's tokens, router, routing decisions, counts, losses and every dense computation;
    * its local experts' weights, gradients and GEMMs: they run on ``R`` rows, ``R = M`` (this rank's kept
      assignments), the volume each rank receives in a job whose ranks route alike; its own rows bound for
      its own experts are among them, with their true expert;
    * the buffers: the all-to-all outputs (``x_RD``, the returned ``y_MD``), the regrouped copy, the expert
      activations, and the same in backward;
    * the host sync on the counts (one ``tolist`` per layer, as the real dispatcher's).

What is synthesised:
    * the tokens received from peer ``s`` are this rank's rows bound for rank ``m(s)`` (no real peer data);
    * the outputs returned for this rank's rows by the peer owning expert ``o*L + e`` are computed by this
      rank's local expert ``e`` (the peer's expert of the same local index is not held here), so the values
      and gradients of those rows are those of a model whose experts ``e, L+e, 2L+e, ...`` share weights,
      with the right shapes, compute and gradient volume;
    * communication is a local copy (``torch.cat`` of blocks), counted in :attr:`bytes_sent` /
      :attr:`bytes_received`: rows crossing to another rank, forward and backward, the counts exchange
      (``E`` int64 per layer) excluded.

Shape legend: M rows this rank sends (its kept assignments, grouped by global expert), R rows it receives,
D model width, E global experts, P EP group size (also the source ranks of received rows), L = E/P local experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_moe.distributed.expert_parallel import ExpertShard, ShardedDispatcher
from lightning_moe.nn.dispatch import DispatchPlan


class SimulatedExpertParallel(ShardedDispatcher):
    """``layer.expert_dispatcher`` for EP rank ``shard.ep_rank`` of ``shard.ep_size``, peers simulated.

    Install it on a layer whose ``experts`` hold only this rank's experts (``shard.offset ..``, as
    :func:`~lightning_moe.distributed.shard_moe_layer` leaves them). Used for planning only: see the module
    docstring for what is real and what is synthesised.

    Args:
        shard: the experts this rank holds.

    Attributes:
        bytes_sent: bytes this rank sent to other ranks since :meth:`reset_counters` (tokens and expert
            outputs forward, their gradients backward).
        bytes_received: bytes it received from other ranks over the same period.
        rows_processed: rows its local experts ran on (forward).

    Example:
        >>> import lightning_moe as lmoe
        >>> from lightning_moe.distributed import shard_moe_layer
        >>> layer = lmoe.MoE(dim=8, num_experts=4, top_k=2)
        >>> shard = shard_moe_layer(layer, "", ep_rank=1, ep_size=2, group=None)  # experts 2, 3
        >>> layer.expert_dispatcher = SimulatedExpertParallel(shard)
        >>> layer(torch.randn(5, 8)).shape, layer.expert_dispatcher.rows_processed
        (torch.Size([5, 8]), 10)
    """

    def __init__(self, shard: ExpertShard) -> None:
        if shard.num_experts % shard.ep_size or not 0 <= shard.ep_rank < shard.ep_size:
            raise ValueError(f"{type(self).__name__}: shard={shard} needs ep_size dividing num_experts and "
                             "0 <= ep_rank < ep_size; build it with shard_moe_layer")
        super().__init__(shard)
        P, r = shard.ep_size, shard.ep_rank
        # mirror[s]: the rank whose experts this rank's rows (sent there) stand in for peer s's rows.
        self.mirror = [(2 * r - s) % P for s in range(P)]
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero :attr:`bytes_sent`, :attr:`bytes_received` and :attr:`rows_processed`."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rows_processed = 0

    def _count(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received

    def exchange_counts(self, send_counts_E: Tensor) -> Tensor:
        # Peer s sends this rank what this rank sends rank mirror[s] (mirrored world; not counted as traffic).
        P, L = self.shard.ep_size, self.shard.num_local
        return send_counts_E.view(P, L)[self.mirror].reshape(-1)

    def exchange_rows(self, x_MD: Tensor, output_splits: Sequence[int], input_splits: Sequence[int]) -> Tensor:
        return _MirroredAllToAll.apply(x_MD, list(input_splits), self)

    def __call__(self, x_MD: Tensor, plan: DispatchPlan, experts: nn.Module) -> Tensor:
        self.rows_processed += plan.num_received
        return super().__call__(x_MD, plan, experts)


def mirrored_all_to_all(x_MD: Tensor, input_splits: Sequence[int], mirror: Sequence[int]) -> Tensor:
    """The all-to-all of the mirrored world: output block ``s`` is input block ``mirror[s]``.

    Args:
        x_MD: rows grouped in ``len(input_splits)`` blocks, block ``d`` bound for rank ``d``.
        input_splits: rows per block.
        mirror: an involution of the ranks (``mirror[mirror[s]] == s``).

    Returns:
        A new tensor (as a real all-to-all's output) of the blocks in the order ``mirror``.
    """
    blocks = torch.split(x_MD, list(input_splits))
    return torch.cat([blocks[m] for m in mirror]) if blocks else x_MD.clone()


class _MirroredAllToAll(torch.autograd.Function):
    """Mirrored all-to-all with its backward (the same permutation, it is an involution), bytes counted."""

    @staticmethod
    def forward(ctx, x_MD: Tensor, input_splits: list[int], sim: SimulatedExpertParallel) -> Tensor:
        ctx.input_splits, ctx.sim = input_splits, sim
        r = sim.shard.ep_rank
        # Rows crossing ranks: all but the block kept by this rank (mirror[r] == r, same size both ways).
        crossing = (x_MD.shape[0] - input_splits[r]) * x_MD.shape[1] * x_MD.element_size()
        sim._count(crossing, crossing)
        return mirrored_all_to_all(x_MD, input_splits, sim.mirror)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        sim, r = ctx.sim, ctx.sim.shard.ep_rank
        output_splits = [ctx.input_splits[m] for m in sim.mirror]
        crossing = (grad_RD.shape[0] - output_splits[r]) * grad_RD.shape[1] * grad_RD.element_size()
        sim._count(crossing, crossing)
        return mirrored_all_to_all(grad_RD.contiguous(), output_splits, sim.mirror), None, None
