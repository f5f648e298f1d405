"""Pure tensor functions of Mixture-of-Experts routing and dispatch.

No modules and no state: every function takes tensors and returns tensors, so each piece is tested
on its own and the modules in ``router.py``, ``experts.py`` and ``moe.py`` stay thin.

Shape legend (suffixes on tensor names):
    T: tokens (flattened leading dims)    D: model width       H: expert hidden width
    E: experts (global)                   K: top_k              N: token->expert assignments (T*K)
    M: assignments kept after capacity    C: expert capacity (expert-choice)
    B: sequences (leading dims before the sequence dim)    S: tokens per sequence (``T = B * S``)
"""

from __future__ import annotations

import torch
from torch import Tensor

SCORE_FUNCS = ("softmax", "sigmoid", "softmax_topk")


def router_scores(logits_TE: Tensor, score_func: str) -> Tensor:
    """Turn router logits into per-expert scores in [0, 1].

    ``"softmax_topk"`` (GPT-OSS) weights the chosen experts by a softmax over their k logits only
    (see :func:`topk_routing`); its per-expert scores, used by the balancing loss and the stats,
    are the softmax over all experts, as for ``"softmax"``.
    """
    if score_func in ("softmax", "softmax_topk"):
        return torch.softmax(logits_TE, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(f"score_func={score_func!r} must be one of {SCORE_FUNCS}")


def group_limited_mask(selection_TE: Tensor, num_groups: int, top_groups: int) -> Tensor:
    """Bool ``[T, E]`` mask of the experts in each token's ``top_groups`` best expert groups (DeepSeek-V3).

    Experts form ``num_groups`` contiguous groups of ``E / num_groups``; a group scores the sum of its
    two highest selection scores (its one score when a group holds a single expert), and each token
    keeps the experts of its ``top_groups`` best groups. Node-limited routing: with one group per
    device or node, a token's experts span at most ``top_groups`` of them.
    """
    num_tokens, num_experts = selection_TE.shape
    per_group = num_experts // num_groups
    scores_TGX = selection_TE.reshape(num_tokens, num_groups, per_group)
    group_scores_TG = scores_TGX.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
    top_group_TG = torch.topk(group_scores_TG, top_groups, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_group_TG, True)
    return keep_TG[:, :, None].expand(-1, -1, per_group).reshape(num_tokens, num_experts)


def topk_routing(
    scores_TE: Tensor,
    top_k: int,
    expert_bias_E: Tensor | None = None,
    normalize_weights: bool = True,
    valid_T: Tensor | None = None,
    num_groups: int = 1,
    top_groups: int = 1,
    routed_scaling_factor: float = 1.0,
    softmax_topk: bool = False,
) -> tuple[Tensor, Tensor]:
    """Token-choice top-k: each token picks its ``top_k`` highest-scoring experts.

    Args:
        scores_TE: router scores (softmax or sigmoid), float32; the raw logits when ``softmax_topk``.
        top_k: experts per token.
        expert_bias_E: aux-loss-free balancing bias (DeepSeek-V3); shifts which experts are
            *chosen*, never the weights the chosen experts get.
        normalize_weights: rescale the k weights of a token to sum to 1. Ignored for ``top_k=1``,
            where it would make every weight 1.0 and cut the router off from the task gradient
            (Switch Transformer scales by the raw probability).
        valid_T: bool mask of tokens to route; the others get expert id ``E`` (a sentinel past the
            last expert, so sorting pushes them to the end) and weight 0.
        num_groups: > 1 limits each token to the experts of ``top_groups`` of ``num_groups``
            contiguous expert groups (DeepSeek-V3's ``n_group``/``topk_group``, see
            :func:`group_limited_mask`); groups are ranked on the biased selection scores.
        top_groups: groups a token may use when ``num_groups > 1``.
        routed_scaling_factor: multiplies the final weights (DeepSeek-V3), after normalization.
        softmax_topk: ``scores_TE`` are logits; choose by them and weight the chosen experts by a
            softmax over their k logits (GPT-OSS). The weights sum to 1 whatever ``normalize_weights``.

    Returns:
        ``(top_ids_TK, top_weights_TK)``: int64 expert ids and float weights.
    """
    selection_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E.to(scores_TE.dtype)
    selection_TE = selection_TE.detach()
    if num_groups > 1:
        keep_TE = group_limited_mask(selection_TE, num_groups, top_groups)
        selection_TE = selection_TE.masked_fill(~keep_TE, float("-inf"))
    # NaN scores (NaN inputs) still yield ids in [0, E): topk never returns an out-of-range index.
    top_ids_TK = torch.topk(selection_TE, top_k, dim=-1, sorted=True).indices
    top_weights_TK = scores_TE.gather(-1, top_ids_TK)
    if softmax_topk:
        top_weights_TK = torch.softmax(top_weights_TK, dim=-1)
    elif normalize_weights and top_k > 1:
        top_weights_TK = top_weights_TK / top_weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if routed_scaling_factor != 1.0:
        top_weights_TK = top_weights_TK * routed_scaling_factor
    if valid_T is not None:
        num_experts = scores_TE.shape[-1]
        top_ids_TK = torch.where(valid_T[:, None], top_ids_TK, num_experts)
        top_weights_TK = top_weights_TK * valid_T[:, None].to(top_weights_TK.dtype)
    return top_ids_TK, top_weights_TK


def expert_choice_routing(
    scores_TE: Tensor, capacity: int, valid_T: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its ``capacity`` best tokens.

    Balanced by construction. It looks at every token of the batch at once, so it is not causal:
    use it for encoders or training-time routing, not for autoregressive decoding.

    Returns:
        ``(token_ids_EC, weights_EC, chosen_EC)``: per expert the chosen token indices, their
        scores, and a bool mask that is False for chosen padding tokens (their weight is 0).
    """
    if valid_T is not None:
        # Padded tokens sort last; if an expert must still take one (capacity > valid tokens)
        # it is masked out of the weights and the counts.
        scores_TE = scores_TE.masked_fill(~valid_T[:, None], -1.0)
    weights_EC, token_ids_EC = torch.topk(scores_TE.t(), capacity, dim=-1, sorted=True)
    chosen_EC = torch.ones_like(token_ids_EC, dtype=torch.bool) if valid_T is None else valid_T[token_ids_EC]
    weights_EC = weights_EC * chosen_EC.to(weights_EC.dtype)
    return token_ids_EC, weights_EC, chosen_EC


def expert_capacity(capacity_factor: float, num_tokens: Tensor | int, top_k: int, num_experts: int) -> Tensor:
    """Slots per expert: ``ceil(capacity_factor * T * k / E)``, as a tensor (no host sync)."""
    tokens = torch.as_tensor(num_tokens, dtype=torch.float64)
    return torch.ceil(capacity_factor * tokens * top_k / num_experts).to(torch.int64)


def sort_by_expert(
    top_ids_TK: Tensor, num_experts: int, capacity: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Order the T*K assignments by expert (stable), applying capacity.

    Assignments are laid out k-major (every token's first choice before any second choice), so
    when an expert overflows, first choices win over second choices and earlier tokens over later
    ones (GShard's priority); the drop order is deterministic.

    Args:
        top_ids_TK: expert ids, ``num_experts`` marks an unrouted (padded) token.
        num_experts: E.
        capacity: slots per expert (0-dim int64 tensor), or None for dropless.

    Returns:
        ``(order_N, keep_N, counts_E, kept_counts_E)``: ``order_N`` indexes the k-major flattened
        assignments so that they run grouped by expert (kept ones of each expert first, dropped and
        padded ones last); ``keep_N`` marks the assignments in ``order_N`` that are kept;
        ``counts_E`` counts assignments before drops, ``kept_counts_E`` after.
    """
    ids_N = top_ids_TK.t().reshape(-1)
    # Not bincount: its output length depends on the data (max id + 1), which torch.compile cannot trace.
    counts_E = ids_N.new_zeros(num_experts + 1).scatter_add_(0, ids_N, torch.ones_like(ids_N))[:num_experts]
    if capacity is None:
        order_N = torch.argsort(ids_N, stable=True)
        keep_N = ids_N[order_N] < num_experts
        return order_N, keep_N, counts_E, counts_E
    kept_counts_E = torch.minimum(counts_E, capacity)
    order_N = torch.argsort(ids_N, stable=True)
    sorted_ids_N = ids_N[order_N]
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    starts_N = torch.cat([starts_E, starts_E.new_zeros(1)])[sorted_ids_N]
    position_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_N
    keep_N = (position_N < capacity) & (sorted_ids_N < num_experts)
    # Second stable sort: per expert, kept assignments stay in place; dropped ones move to the end.
    key_N = torch.where(keep_N, sorted_ids_N, num_experts)
    regroup_N = torch.argsort(key_N, stable=True)
    return order_N[regroup_N], keep_N[regroup_N], counts_E, kept_counts_E


def load_balancing_loss(
    probs_TE: Tensor, counts_E: Tensor, num_tokens: Tensor | int, top_k: int, valid_T: Tensor | None = None
) -> Tensor:
    """Switch Transformer balancing loss without its coefficient: ``E * sum_i f_i * P_i``.

    ``f_i`` is the share of the ``num_tokens * top_k`` token->expert assignments routed to expert i
    (counted before drops; no gradient flows through counts), ``P_i`` the mean router probability
    of expert i over the routed tokens. Equals 1 when routing is uniform.

    The global scope of :class:`~lightning_moe.MoE` calls it with the counts and the token count of
    the global batch (summed over ranks) and this rank's ``probs_TE``: ``P_i`` is then this rank's
    share of the global mean, and W ranks' results, each times W, average to the global-batch loss.

    Args:
        probs_TE: per-token probabilities over experts (rows sum to 1).
        counts_E: assignments per expert.
        num_tokens: routed tokens (padding excluded) that ``counts_E`` counts.
        top_k: assignments per token.
        valid_T: bool mask of routed tokens; rows outside it do not enter ``P_i``.
    """
    num_experts = probs_TE.shape[-1]
    tokens = torch.as_tensor(num_tokens, device=probs_TE.device).to(probs_TE.dtype).clamp_min(1)
    if valid_T is not None:
        probs_TE = probs_TE * valid_T[:, None].to(probs_TE.dtype)
    f_E = counts_E.to(probs_TE.dtype) / (tokens * top_k)
    p_E = probs_TE.sum(dim=0) / tokens
    return num_experts * (f_E * p_E).sum()


def sequence_load_balancing_loss(
    probs_BSE: Tensor, top_ids_BSK: Tensor, valid_BS: Tensor | None = None, num_sequences: Tensor | int | None = None
) -> Tensor:
    """DeepSeek-V3's sequence-wise balancing loss without its coefficient: the mean over sequences of
    :func:`load_balancing_loss` computed on each sequence alone.

    For sequence b with ``S_b`` routed tokens: ``E * sum_i f_bi * P_bi``, ``f_bi`` the share of its
    ``S_b * K`` assignments routed to expert i (before drops), ``P_bi`` the mean probability of expert
    i over its routed tokens. A sequence without a routed token (all padding) has no loss and is not
    counted. It balances every sequence on its own, which a batch-level loss does not: a batch of
    sequences that each use one expert can be balanced as a whole.

    Args:
        probs_BSE: per-token probabilities over experts (rows sum to 1: normalise sigmoid scores first).
        top_ids_BSK: chosen experts; ``E`` marks an unrouted (padded) token (:func:`topk_routing`).
        valid_BS: bool mask of routed tokens; default all.
        num_sequences: divisor, default the sequences here with a routed token. The global scope passes
            the number over every rank, so that W ranks' results, each times W, average to the
            global-batch value.

    Returns:
        ``sum_b loss_b / num_sequences`` (0 without a routed sequence).

    Example:
        >>> probs_BSE = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.9, 0.1], [0.9, 0.1]]])
        >>> top_ids_BSK = torch.tensor([[[0], [1]], [[0], [0]]])  # sequence 0 balanced, sequence 1 not
        >>> round(float(sequence_load_balancing_loss(probs_BSE, top_ids_BSK)), 4)  # (1.0 + 2 * 0.9) / 2
        1.4
    """
    B, S, E = probs_BSE.shape
    K = top_ids_BSK.shape[-1]
    ids_BN = top_ids_BSK.reshape(B, S * K)
    # Column E collects the padding sentinel and is dropped.
    counts_BE = torch.zeros(B, E + 1, dtype=torch.long, device=ids_BN.device)
    counts_BE = counts_BE.scatter_add_(1, ids_BN, torch.ones_like(ids_BN))[:, :E]
    if valid_BS is None:
        tokens_B = torch.full((B,), S, dtype=probs_BSE.dtype, device=probs_BSE.device)
    else:
        tokens_B = valid_BS.sum(dim=1).to(probs_BSE.dtype)
        probs_BSE = probs_BSE * valid_BS[..., None].to(probs_BSE.dtype)
    if num_sequences is None:
        num_sequences = (tokens_B > 0).sum()
    tokens_B = tokens_B.clamp_min(1)
    f_BE = counts_BE.to(probs_BSE.dtype) / (tokens_B[:, None] * K)
    p_BE = probs_BSE.sum(dim=1) / tokens_B[:, None]
    loss_B = E * (f_BE * p_BE).sum(dim=-1)
    return loss_B.sum() / torch.as_tensor(num_sequences, device=loss_B.device).to(loss_B.dtype).clamp_min(1)


def z_loss(logits_TE: Tensor, valid_T: Tensor | None = None, num_tokens: Tensor | int | None = None) -> Tensor:
    """ST-MoE router z-loss without its coefficient: ``mean(logsumexp(logits)^2)`` over routed tokens.

    Args:
        logits_TE: router logits.
        valid_T: bool mask of routed tokens; default all.
        num_tokens: divisor of the sum over routed tokens, default their number here. The global scope
            passes the routed tokens of every rank (see :func:`load_balancing_loss`).
    """
    lse_T = torch.logsumexp(logits_TE, dim=-1).square()
    if num_tokens is not None:
        total = lse_T.sum() if valid_T is None else (lse_T * valid_T).sum()
        return total / torch.as_tensor(num_tokens, device=total.device).to(total.dtype).clamp_min(1)
    if valid_T is None:
        return lse_T.mean() if lse_T.numel() else lse_T.sum()
    return (lse_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def routing_entropy(scores_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the per-token router distribution; high = undecided router."""
    p_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    h_T = -(p_TE * torch.log(p_TE.clamp_min(1e-20))).sum(dim=-1)
    if valid_T is None:
        return h_T.mean() if h_T.numel() else h_T.sum()
    return (h_T * valid_T).sum() / valid_T.sum().clamp_min(1)
