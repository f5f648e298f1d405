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

In eval mode nothing is reduced (losses are this rank's), so evaluation never waits for peers; nor is
anything reduced when nothing uses the sums (both coefficients 0 and no bias balancing: the losses are 0
either way). A layer alone (one rank, or no reduction installed) computes under ``"global"`` exactly what
it computes under ``"local"``.

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

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_moe.nn import functional as MF

AUX_LOSS_SCOPES = ("global", "local", "sequence")


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


def check_scope(aux_loss_scope: str, router: str, owner: str) -> None:
    """Raise a ``ValueError`` naming the fix for a scope that does not exist or does not apply to ``router``."""
    if aux_loss_scope not in AUX_LOSS_SCOPES:
        raise ValueError(f"{owner}: aux_loss_scope={aux_loss_scope!r} must be one of {AUX_LOSS_SCOPES}")
    if aux_loss_scope == "sequence" and router != "token_choice":
        raise ValueError(f"{owner}: aux_loss_scope='sequence' needs router='token_choice': expert choice has no "
                         "balancing loss (each expert fills its capacity); use 'global' or 'local', which "
                         "decide the tokens its z-loss is a mean over")


def start_count_reduction(reduction: CountReduction, aux_loss_scope: str, counts_E: Tensor,
                          num_routed: Tensor | int, valid_T: Tensor | None, seq_len: int) -> Tensor | None:
    """Step 1: start summing ``counts_X = [counts_E, routed tokens, routed sequences]`` over the ranks.

    Args:
        reduction: the layer's count reduction.
        aux_loss_scope: the layer's scope; the layer passes ``"local"`` in eval mode (evaluation never
            waits for peers: ranks may run different numbers of evaluation batches).
        counts_E: assignments per expert, before capacity drops.
        num_routed: routed tokens (padding excluded).
        valid_T: bool mask of routed tokens, or None.
        seq_len: S, tokens per sequence (the sequence scope counts sequences with a routed token).

    Returns:
        The pending sum, or None where the losses are this rank's own (scope ``"local"``, one rank).
    """
    if aux_loss_scope == "local" or reduction.size == 1:
        return None
    with torch.no_grad():
        routed = torch.as_tensor(num_routed, device=counts_E.device).view(1)
        num_tokens = valid_T.numel() if valid_T is not None else int(num_routed)
        if aux_loss_scope != "sequence" or num_tokens == 0:
            sequences = torch.zeros_like(routed)
        elif valid_T is None:
            sequences = torch.full_like(routed, num_tokens // seq_len)
        else:
            sequences = valid_T.view(-1, seq_len).any(dim=1).sum().view(1)
        counts_X = torch.cat([counts_E, routed.to(counts_E.dtype), sequences.to(counts_E.dtype)])
    return reduction.start(counts_X)


class ScopedLosses(NamedTuple):
    """The losses of one forward, without coefficients, and the counts they were formed on.

    Attributes:
        balance: the balancing loss (None for expert choice: balanced by construction).
        z: the router z-loss.
        global_counts_E: assignments per expert summed over the ``reduced_over`` ranks.
        reduced_over: W, the ranks whose counts were summed (1: this rank's own).
    """

    balance: Tensor | None
    z: Tensor
    global_counts_E: Tensor
    reduced_over: int


def scoped_losses(aux_loss_scope: str, reduction: CountReduction, pending_X: Tensor | None, logits_TE: Tensor,
                  valid_T: Tensor | None, counts_E: Tensor, num_routed: Tensor | int, top_k: int,
                  probs_TE: Tensor | None = None, top_ids_TK: Tensor | None = None, seq_len: int = 1) -> ScopedLosses:
    """Step 2: wait for the sum (if one was started) and form the losses of the scope.

    Without a pending sum every mean is over this rank's routed tokens (sequences), W = 1: exactly the
    losses before scopes existed. With one, ``f_i`` and the divisors come from the global batch and the
    sums over tokens (sequences) from this rank, times W (see the module docstring).

    Args:
        aux_loss_scope: the layer's scope.
        reduction: the layer's count reduction (its ``wait`` and ``size``).
        pending_X: what :func:`start_count_reduction` returned.
        logits_TE: router logits (z-loss).
        valid_T: bool mask of routed tokens, or None.
        counts_E: this rank's assignments per expert, before drops.
        num_routed: this rank's routed tokens.
        top_k: assignments per token.
        probs_TE: token-choice probabilities (rows sum to 1); None for expert choice.
        top_ids_TK: token-choice expert ids (``E`` marks padding); None for expert choice.
        seq_len: S, tokens per sequence (sequence scope).
    """
    W, global_counts_E, tokens, sequences = 1, counts_E, num_routed, None
    if pending_X is not None:
        totals_X = reduction.wait(pending_X)
        E = counts_E.shape[0]
        W, global_counts_E, tokens, sequences = reduction.size, totals_X[:E], totals_X[E], totals_X[E + 1]
    z = MF.z_loss(logits_TE, valid_T, None if pending_X is None else tokens)
    balance = None
    if probs_TE is not None and top_ids_TK is not None and aux_loss_scope == "sequence":
        B = probs_TE.shape[0] // seq_len if seq_len else 0
        valid_BS = None if valid_T is None else valid_T.view(B, seq_len)
        balance = MF.sequence_load_balancing_loss(probs_TE.view(B, seq_len, -1), top_ids_TK.view(B, seq_len, -1),
                                                  valid_BS, sequences)
    elif probs_TE is not None and top_ids_TK is not None:
        balance = MF.load_balancing_loss(probs_TE, global_counts_E, tokens, top_k, valid_T)
    if W != 1:
        z, balance = z * W, None if balance is None else balance * W
    return ScopedLosses(balance, z, global_counts_E, W)


__all__ = ["AUX_LOSS_SCOPES", "CountReduction", "LocalCountReduction", "ScopedLosses", "check_scope",
           "scoped_losses", "start_count_reduction"]
