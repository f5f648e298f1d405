"""Direct unit tests of lightning_moe.nn.functional: drop order, the padding sentinel, the balancing bias, capacity
and the losses against their formulas, each on hand-made tensors and against a for-loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.nn import functional as MF


def _loop_keep(top_ids_TK: torch.Tensor, num_experts: int, capacity: int | None) -> list[tuple[int, int]]:
    """Kept ``(k, t)`` pairs, deciding in GShard's priority: every first choice, then every second, ... in token
    order; an expert keeps an assignment while it has a free slot; id ``num_experts`` is padding."""
    used, kept = [0] * num_experts, []
    T, K = top_ids_TK.shape
    for k in range(K):
        for t in range(T):
            e = int(top_ids_TK[t, k])
            if e < num_experts and (capacity is None or used[e] < capacity):
                used[e] += 1
                kept.append((k, t))
    return kept


def test_capacity_drops_later_choices_first_then_later_tokens():
    # E=3, capacity 2. Expert 0 is wanted by t0, t1, t3 first and t2 second: t0, t1 keep it; t3 loses it to
    # earlier tokens and t2 to first choices, although t2 comes before t3.
    top_ids_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    order_N, keep_N, counts_E, kept_E = MF.sort_by_expert(top_ids_TK, 3, capacity=torch.tensor(2))
    # Assignment n = k * T + t (k-major): kept ones grouped by expert in n order, then the dropped ones.
    assert order_N.tolist() == [0, 1, 2, 4, 5, 3, 6, 7]
    assert keep_N.tolist() == [True] * 5 + [False] * 3
    assert counts_E.tolist() == [4, 3, 1] and kept_E.tolist() == [2, 2, 1]
    assert sorted((int(n) // 4, int(n) % 4) for n in order_N[keep_N]) == sorted(_loop_keep(top_ids_TK, 3, 2))


@pytest.mark.parametrize("capacity", [None, 1, 2, 3, 5])
def test_sort_by_expert_matches_the_loop_on_random_routing(capacity):
    g = torch.Generator().manual_seed(capacity or 0)
    for _ in range(20):
        T, K, E = int(torch.randint(1, 12, (1,), generator=g)), 2, 4
        top_ids_TK = torch.randint(0, E + 1, (T, K), generator=g)  # id E: padded token
        cap = None if capacity is None else torch.tensor(capacity)
        order_N, keep_N, counts_E, kept_E = MF.sort_by_expert(top_ids_TK, E, cap)
        ids_N = top_ids_TK.t().reshape(-1)
        kept = order_N[keep_N]
        assert sorted(order_N.tolist()) == list(range(T * K))  # a permutation
        assert sorted((int(n) // T, int(n) % T) for n in kept) == sorted(_loop_keep(top_ids_TK, E, capacity))
        assert ids_N[kept].tolist() == sorted(ids_N[kept].tolist())  # grouped by expert ...
        for e in range(E):  # ... each expert's rows in assignment order, as many as kept_counts says
            rows = kept[ids_N[kept] == e].tolist()
            assert rows == sorted(rows) and len(rows) == int(kept_E[e])
        assert counts_E.tolist() == [int((ids_N == e).sum()) for e in range(E)]
        assert not keep_N[int(keep_N.sum()):].any()  # kept first, then dropped and padded


def test_padding_sentinel_gets_id_E_weight_0_sorts_last_and_is_not_counted():
    E = 4
    scores_TE = torch.softmax(torch.randn(5, E, generator=torch.Generator().manual_seed(0)), -1)
    valid_T = torch.tensor([True, False, True, True, False])
    top_ids_TK, weights_TK = MF.topk_routing(scores_TE, 2, valid_T=valid_T)
    assert (top_ids_TK[~valid_T] == E).all() and (weights_TK[~valid_T] == 0).all()
    assert (top_ids_TK[valid_T] < E).all()
    torch.testing.assert_close(weights_TK[valid_T].sum(-1), torch.ones(3))
    for capacity in (None, torch.tensor(1)):
        order_N, keep_N, counts_E, kept_E = MF.sort_by_expert(top_ids_TK, E, capacity)
        ids_N = top_ids_TK.t().reshape(-1)
        assert int(counts_E.sum()) == 3 * 2  # padded tokens take no count ...
        assert (ids_N[order_N][-4:] == E).all() and not keep_N[-4:].any()  # ... and sort last, never kept
        assert int(kept_E.sum()) == int(keep_N.sum())


def test_expert_bias_changes_the_choice_never_the_weights():
    scores_TE = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), -1).requires_grad_()
    bias_E = torch.tensor([0.0, 0.0, 0.0, 10.0], requires_grad=True)
    ids, weights = MF.topk_routing(scores_TE, 2)
    biased_ids, biased_weights = MF.topk_routing(scores_TE, 2, expert_bias_E=bias_E)
    assert (biased_ids[:, 0] == 3).all() and not torch.equal(biased_ids, ids)  # the bias decides the choice
    chosen = scores_TE.gather(-1, biased_ids)
    torch.testing.assert_close(biased_weights, chosen / chosen.sum(-1, keepdim=True))  # weights: raw scores
    biased_weights.sum().backward()
    assert bias_E.grad is None and scores_TE.grad is not None  # no gradient reaches the bias
    unnormalised_ids, unnormalised = MF.topk_routing(scores_TE, 1, expert_bias_E=bias_E)
    torch.testing.assert_close(unnormalised, scores_TE.gather(-1, unnormalised_ids))  # top-1 keeps the raw score


@pytest.mark.parametrize(("factor", "tokens", "top_k", "experts", "slots"),
                         [(1.0, 10, 2, 4, 5), (1.25, 10, 2, 4, 7), (0.5, 3, 1, 4, 1), (2.0, 0, 2, 8, 0),
                          (1.0, 7, 1, 7, 1)])
def test_expert_capacity_is_ceil_of_factor_tokens_k_over_e(factor, tokens, top_k, experts, slots):
    for num_tokens in (tokens, torch.tensor(tokens)):
        capacity = MF.expert_capacity(factor, num_tokens, top_k, experts)
        assert capacity.dtype == torch.int64 and capacity.ndim == 0
        assert int(capacity) == slots == math.ceil(factor * tokens * top_k / experts)


def test_load_balancing_loss_is_e_times_sum_of_f_times_p():
    g = torch.Generator().manual_seed(2)
    T, E, K = 7, 4, 2
    probs_TE = torch.softmax(torch.randn(T, E, generator=g), -1)
    valid_T = torch.tensor([True, True, False, True, True, True, False])
    top_ids_TK, _ = MF.topk_routing(probs_TE, K, valid_T=valid_T)
    counts_E = torch.bincount(top_ids_TK.reshape(-1), minlength=E + 1)[:E]
    routed = int(valid_T.sum())
    loss = MF.load_balancing_loss(probs_TE, counts_E, routed, K, valid_T=valid_T)
    expected = E * sum(
        (int(counts_E[i]) / (routed * K)) * sum(float(probs_TE[t, i]) for t in range(T) if valid_T[t]) / routed
        for i in range(E)
    )
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    uniform = MF.load_balancing_loss(torch.full((8, 4), 0.25), torch.tensor([4, 4, 4, 4]), 8, 2)
    assert float(uniform) == pytest.approx(1.0)


def test_z_loss_is_the_mean_squared_logsumexp_over_routed_tokens():
    logits_TE = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    valid_T = torch.tensor([True, False, True, True, False])
    lse = [math.log(sum(math.exp(float(v)) for v in row)) for row in logits_TE]
    assert float(MF.z_loss(logits_TE)) == pytest.approx(sum(x * x for x in lse) / 5, rel=1e-5)
    assert float(MF.z_loss(logits_TE, valid_T)) == pytest.approx((lse[0] ** 2 + lse[2] ** 2 + lse[3] ** 2) / 3,
                                                                 rel=1e-5)
    assert float(MF.z_loss(torch.zeros(0, 3))) == 0.0
    assert float(MF.z_loss(logits_TE, torch.zeros(5, dtype=torch.bool))) == 0.0
