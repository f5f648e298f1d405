"""MoE options that published models need (router bias, softmax over the top k, group-limited top-k,
routed scaling, fixed score-correction bias, gated shared expert, GPT-OSS's SwiGLU), each against the
per-token loop reference in float64: outputs and gradients of every parameter and of the input."""

from __future__ import annotations

import pytest
import torch

from lightning_moe import MoE
from lightning_moe.nn import functional as MF
from lightning_moe.nn.experts import GroupedExperts, swiglu_oai

from reference import reference_moe

OPTIONS = [
    dict(num_experts=4, top_k=2, router_bias=True),
    dict(num_experts=4, top_k=2, score_func="softmax_topk", router_bias=True),
    dict(num_experts=4, top_k=1, score_func="softmax_topk"),
    dict(num_experts=4, top_k=3, score_func="softmax_topk", capacity_factor=0.75),
    dict(num_experts=8, top_k=2, score_func="sigmoid", num_groups=4, top_groups=2, use_expert_bias=True,
         routed_scaling_factor=2.5),
    dict(num_experts=8, top_k=3, score_func="sigmoid", num_groups=2, top_groups=1, normalize_weights=False),
    dict(num_experts=8, top_k=2, num_groups=8, top_groups=3, capacity_factor=1.0),
    dict(num_experts=4, top_k=2, routed_scaling_factor=0.5, normalize_weights=False),
    dict(num_experts=4, top_k=2, score_func="sigmoid", use_expert_bias=True),
    dict(num_experts=4, top_k=2, activation="swiglu", num_shared_experts=1, shared_expert_gate=True,
         shared_expert_hidden_dim=6),
    dict(num_experts=4, top_k=2, num_shared_experts=2, shared_expert_hidden_dim=5),
    dict(num_experts=4, top_k=2, activation="swiglu_oai", bias=True, swiglu_limit=0.4),
    dict(num_experts=4, top_k=2, activation="swiglu_oai", swiglu_alpha=0.7, swiglu_limit=2.0, num_shared_experts=1),
    dict(num_experts=4, top_k=2, router="expert_choice", router_bias=True),
]


def _ids(option):
    return ",".join(f"{k}={v}" for k, v in option.items())


def _grads(layer, x):
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]
    return grads + [x.grad.clone()]


def _layer(option) -> MoE:
    torch.manual_seed(0)
    layer = MoE(8, **option).double()
    with torch.no_grad():
        if layer.router.gate.bias is not None:
            layer.router.gate.bias.normal_()  # zero-initialised: give the bias something to do
        if option.get("use_expert_bias"):
            layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, layer.num_experts))
        for name in ("b1", "b2", "b3"):
            if getattr(layer.experts, name, None) is not None:
                getattr(layer.experts, name).normal_()
    return layer


@pytest.mark.parametrize("option", OPTIONS, ids=[_ids(o) for o in OPTIONS])
@pytest.mark.parametrize("padded", [False, True])
def test_option_matches_reference_outputs_and_grads(option, padded):
    layer = _layer(option)
    x = torch.randn(3, 7, 8, dtype=torch.double, requires_grad=True)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) < 0.3 if padded else None

    y = layer(x, padding_mask=mask)
    y.pow(2).sum().backward()
    fast = _grads(layer, x)
    layer.zero_grad()
    x.grad = None
    y_ref = reference_moe(layer, x, mask)
    y_ref.pow(2).sum().backward()
    ref = _grads(layer, x)

    torch.testing.assert_close(y, y_ref)
    for g_fast, g_ref in zip(fast, ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref)


def test_options_change_the_function():
    """Each option is live: switching it off changes the output (so the reference tests can fail)."""
    x = torch.randn(20, 8, dtype=torch.double)
    for option, off in [
        (dict(num_experts=4, router_bias=True), dict(router_bias=False)),
        (dict(num_experts=8, score_func="sigmoid", num_groups=4, top_groups=1), dict(num_groups=1, top_groups=1)),
        (dict(num_experts=4, routed_scaling_factor=2.5), dict(routed_scaling_factor=1.0)),
        (dict(num_experts=4, score_func="sigmoid", use_expert_bias=True), dict(use_expert_bias=False)),
        (dict(num_experts=4, num_shared_experts=1, shared_expert_gate=True), dict(shared_expert_gate=False)),
        (dict(num_experts=4, activation="swiglu_oai", swiglu_limit=0.3), dict(swiglu_limit=7.0)),
        (dict(num_experts=4, top_k=1, score_func="softmax_topk"), dict(score_func="softmax")),
    ]:
        layer = _layer(option)
        other = _layer({**option, **off})
        other.load_state_dict(layer.state_dict(), strict=False)
        assert not torch.allclose(layer(x), other(x)), option


def test_softmax_topk_equals_renormalised_softmax_for_k_above_one():
    torch.manual_seed(0)
    a = MoE(8, 6, top_k=3, score_func="softmax_topk").double()
    b = MoE(8, 6, top_k=3, score_func="softmax", normalize_weights=True).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(50, 8, dtype=torch.double)
    torch.testing.assert_close(a(x), b(x))
    # Its balancing loss and stats use the softmax over all experts, as "softmax" does.
    torch.testing.assert_close(a.load_balancing_loss, b.load_balancing_loss)


def test_group_limited_routing_keeps_each_token_in_its_top_groups():
    torch.manual_seed(0)
    scores_TE = torch.rand(64, 8)
    ids_TK, _ = MF.topk_routing(scores_TE, 2, num_groups=4, top_groups=1)
    group_T2 = ids_TK // 2
    assert (group_T2[:, 0] == group_T2[:, 1]).all()  # one group of two experts per token
    group_scores_TG = scores_TE.view(64, 4, 2).sum(-1)
    assert (group_T2[:, 0] == group_scores_TG.argmax(-1)).all()


def test_score_correction_bias_steers_choice_not_weights():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=1, score_func="sigmoid", use_expert_bias=True)
    layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.randn(30, 8)
    routing = layer.router(x)
    assert (routing.top_ids_TK == 3).all()
    torch.testing.assert_close(routing.top_weights_TK[:, 0], torch.sigmoid(routing.logits_TE[:, 3]))
    layer.update_expert_bias()  # bias_update_rate=0: a fixed bias stays as loaded
    assert layer.router.expert_bias[3] == 10.0


def test_swiglu_oai_matches_its_definition_and_clamps():
    g = torch.linspace(-10, 10, 41)
    u = torch.linspace(9, -9, 41)
    expected = (u.clamp(-7, 7) + 1) * g.clamp(max=7) * torch.sigmoid(1.702 * g.clamp(max=7))
    torch.testing.assert_close(swiglu_oai(g, u, 1.702, 7.0), expected)
    bank = GroupedExperts(2, 4, 3, activation="swiglu_oai", bias=True)
    assert bank.b3.shape == (2, 3) and bank.swiglu_alpha == 1.702 and bank.swiglu_limit == 7.0
    assert GroupedExperts(2, 4, 3, activation="swiglu", bias=True).b3 is None  # plain SwiGLU unchanged


def test_router_bias_starts_at_zero_and_trains():
    layer = MoE(8, 4, router_bias=True)
    assert layer.router.gate.bias.shape == (4,) and not layer.router.gate.bias.any()
    layer(torch.randn(10, 8)).pow(2).sum().backward()
    assert layer.router.gate.bias.grad is not None and layer.router.gate.bias.grad.abs().sum() > 0


def test_sharded_bank_without_b3_refuses_to_run():
    bank = GroupedExperts(4, 8, 6, activation="swiglu_oai", bias=True)
    bank.w1 = torch.nn.Parameter(bank.w1[:2].detach().clone())  # as an expert-parallel shard that missed b3
    bank.num_experts = 2
    with pytest.raises(ValueError, match="b3 holds 4 experts"):
        bank(torch.randn(3, 8), [1, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=4, router="expert_choice", score_func="softmax_topk"), "softmax_topk.*token_choice"),
        (dict(num_experts=4, router="expert_choice", num_groups=2), "num_groups=2 needs router='token_choice'"),
        (dict(num_experts=4, router="expert_choice", routed_scaling_factor=2.0), "routed_scaling_factor"),
        (dict(num_experts=4, router="expert_choice", use_expert_bias=True), "use_expert_bias"),
        (dict(num_experts=6, num_groups=4), "num_groups=4 must divide num_experts=6"),
        (dict(num_experts=8, num_groups=4, top_groups=5), "top_groups=5 must be <= num_groups=4"),
        (dict(num_experts=8, top_k=3, num_groups=4, top_groups=1), "top_k=3 exceeds the 2 experts"),
        (dict(num_experts=8, num_groups=0), "num_groups=0"),
        (dict(num_experts=4, routed_scaling_factor=0.0), "routed_scaling_factor=0.0"),
        (dict(num_experts=4, shared_expert_gate=True), "shared_expert_gate=True needs num_shared_experts"),
        (dict(num_experts=4, shared_expert_hidden_dim=8), "shared_expert_hidden_dim=8 needs num_shared_experts"),
        (dict(num_experts=4, num_shared_experts=1, shared_expert_hidden_dim=-2), "shared_expert_hidden_dim=-2"),
        (dict(num_experts=4, swiglu_limit=7.0), "swiglu_limit=7.0 applies to activation='swiglu_oai'"),
        (dict(num_experts=4, activation="swiglu_oai", swiglu_alpha=-1.0), "swiglu_alpha=-1.0 must be > 0"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, **kwargs)


def test_options_are_readable_and_in_repr():
    layer = MoE(8, 8, score_func="sigmoid", num_groups=4, top_groups=2, routed_scaling_factor=2.5,
                use_expert_bias=True, router_bias=True, num_shared_experts=1, shared_expert_gate=True)
    assert (layer.num_groups, layer.top_groups, layer.routed_scaling_factor) == (4, 2, 2.5)
    assert layer.use_expert_bias and layer.router_bias and layer.shared_expert_gate
    assert layer.shared_expert_hidden_dim == 32
    text = repr(layer)
    for part in ("num_groups=4", "top_groups=2", "routed_scaling_factor=2.5", "shared_expert_gate=True"):
        assert part in text
