"""Loss scopes and the count reduction: balancing losses that mean the same on 1 rank and on 10,000.

``MoE(aux_loss_scope=...)`` decides which tokens the balancing loss and the z-loss are means over:

- ``"global"`` (default): the global batch, every rank's tokens of this forward. With W ranks, global
  counts ``c_i`` (assignments per expert, before capacity drops) and ``T_g`` routed tokens (both summed
  over the ranks), rank r's losses are::

      balance_r = W * E * sum_i  c_i / (T_g * K)  *  (sum over r's routed tokens t of p_ti) / T_g
      z_r       = W * (sum over r's routed tokens t of logsumexp(logits_t)^2) / T_g

  The mean over ranks of ``balance_r`` (and of ``z_r``) is exactly the single-process loss on the global
  batch, and data parallelism optimises that mean (DDP averages dense gradients; no gradient flows
  through counts). Padding is excluded everywhere, so a rank of mostly padding weighs less than a full
  one, as its tokens do in the global batch. The W ranks are every rank that trains on a different part
  of the batch: ``MoEStrategy`` sums over the whole world (data x expert dims).
- ``"local"``: this rank's tokens only (the behaviour before scopes existed; no collective). Its mean
  over ranks differs from the global-batch loss whenever ranks route differently.
- ``"sequence"``: DeepSeek-V3's sequence-wise balancing loss
  (:func:`~lightning_moe.nn.functional.sequence_load_balancing_loss`): the balancing loss of each
  sequence (input ``[..., S, dim]``, sequence dim -2, padding excluded per sequence), averaged over the
  ``N_g`` sequences of the global batch that have a routed token: ``W * sum over r's sequences / N_g``.
  Its z-loss is the global one. Token choice only: expert choice has no balancing loss (each expert
  fills its capacity), and its z-loss follows ``"global"`` or ``"local"``.

What "the batch" is: one forward of the layer. Under gradient accumulation each micro-batch's loss is
the loss of the global micro-batch (every rank's tokens of that forward), exactly as single-process
training on the same micro-batches, each loss divided by the number of micro-batches: a mean over the
whole optimizer step would need every micro-batch's counts before the first backward (two forwards,
or every micro-batch's graph kept alive). Per-rank capacity (``capacity_factor``) stays per rank: the
drops depend on each rank's own tokens, so only dropless routing reproduces single-process outputs.

In eval mode nothing is reduced (losses are this rank's), so evaluation never waits for peers, and a
layer alone (one rank, or no reduction installed) computes under ``"global"`` exactly what it computes
under ``"local"``.

How the sums travel: the layer puts counts, routed tokens and routed sequences into one integer
vector and asks its :class:`CountReduction` to sum it over the ranks, once per training forward:

1. ``pending_X = reduction.start(counts_X)`` right after routing, before the dispatch: the sum
   travels while the experts run (asynchronous, no host sync);
2. ``totals_X = reduction.wait(pending_X)`` when the losses are formed, after the combine.

The layer knows no process group: :class:`LocalCountReduction` (size 1, the default) returns its
input, and a strategy installs a :class:`~lightning_moe.distributed.ProcessGroupCountReduction` from
outside (``layer.count_reduction = ...``), as it installs the expert dispatcher. The layer records the
summed counts (``global_tokens_per_expert``, ``reduced_over``), which is where bias balancing
(:class:`~lightning_moe.MoELightningModule`) takes them from instead of summing them again.

Shape legend (the package's, see :mod:`lightning_moe.nn.functional`): E experts, X = E + 2 entries of
the reduced vector: assignments per expert ``[E]`` (before capacity drops), routed tokens, sequences
with at least one routed token (0 outside the sequence scope).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class CountReduction(Protocol):
    """How an :class:`~lightning_moe.MoE` layer sums its routing counts over ranks (a seam, installed from outside).

    Implementations: :class:`LocalCountReduction` (default: one rank, nothing to sum) and
    :class:`~lightning_moe.distributed.ProcessGroupCountReduction` (every rank of a process group). Every
    rank of the group must call ``start`` and ``wait`` once per training forward of the layer, in the same
    order as its peers (as for the expert dispatcher's exchanges).

    Attributes:
        size: W, the number of ranks the sum spans. The layer multiplies its loss by W so that the mean
            of the per-rank losses (what data parallelism averages) is the loss of the global batch.

    Example:
        >>> import torch
        >>> reduction = LocalCountReduction()
        >>> reduction.wait(reduction.start(torch.tensor([3, 1, 2, 1]))).tolist(), reduction.size
        ([3, 1, 2, 1], 1)
    """

    size: int

    def start(self, counts_X: Tensor) -> Tensor:
        """Begin summing the integer vector ``counts_X`` over the ranks; returns a pending result (no host sync)."""
        ...

    def wait(self, pending_X: Tensor) -> Tensor:
        """The sum started by :meth:`start`, ready to use (waits for the collective where there is one)."""
        ...


class LocalCountReduction:
    """The default :class:`CountReduction`: this process is the only rank; the counts are already the total."""

    size = 1

    def start(self, counts_X: Tensor) -> Tensor:
        return counts_X

    def wait(self, pending_X: Tensor) -> Tensor:
        return pending_X

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


__all__ = ["CountReduction", "LocalCountReduction"]
