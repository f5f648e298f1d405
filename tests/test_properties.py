"""Property tests of the MoE layer (hypothesis): any shape, dtype, padding, capacity, routing and logits.

Rules checked on every drawn case:

* the output has the input's shape and the layer's dtype, finite wherever the token is finite;
* the counts add up: every routed token is counted ``top_k`` times before drops (token choice), drops never
  exceed the assignments, padded tokens are neither routed nor counted, and their routed output is zero;
* loss and gradients are finite for finite inputs, also with zero tokens, with extreme or all-equal logits
  and with every token on one expert;
* the only exceptions are the documented ones: ``ValueError`` for bad arguments, ``FloatingPointError`` for
  non-finite router logits under ``check_finite=True``.

``max_examples`` stays small so that the suite stays fast; ``HYPOTHESIS_PROFILE=thorough`` draws more.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_moe import MoE

settings.register_profile("fast", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
LOGITS = ("random", "extreme", "equal")  # equal logits with top_k=1: every token on one expert


@st.composite
def layers(draw) -> tuple[MoE, dict]:
    num_experts = draw(st.integers(1, 6))
    config = dict(
        dim=draw(st.integers(1, 12)),
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts)),
        hidden_dim=draw(st.integers(1, 12)),
        activation=draw(st.sampled_from(["gelu", "relu", "silu", "swiglu"])),
        router=draw(st.sampled_from(["token_choice", "expert_choice"])),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        capacity_factor=draw(st.none() | st.floats(0.05, 4.0)),
        num_shared_experts=draw(st.integers(0, 1)),
        dtype=DTYPES[draw(st.sampled_from(sorted(DTYPES)))],
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = MoE(**config)
    logits = draw(st.sampled_from(LOGITS))
    with torch.no_grad():
        if logits == "extreme":
            layer.router.gate.weight.mul_(1e4)
        elif logits == "equal":
            layer.router.gate.weight.zero_()
    return layer, {**config, "logits": logits}


@st.composite
def inputs(draw, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))) + (dim,)
    x = torch.empty(shape, dtype=torch.float64).uniform_(-10, 10, generator=torch.Generator().manual_seed(
        draw(st.integers(0, 2**16)))).to(dtype)
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=math.prod(shape[:-1]),
                                          max_size=math.prod(shape[:-1]))), dtype=torch.bool).reshape(shape[:-1])
    return x, mask


def _check_counts(layer: MoE, config: dict, routed: int) -> None:
    counts = layer.tokens_per_expert
    assert counts.shape == (config["num_experts"],) and counts.dtype == torch.long and (counts >= 0).all()
    assert int(layer.routed_tokens) == routed
    assert 0 <= int(layer.dropped_tokens) <= int(layer.assignments)
    if config["router"] == "token_choice":
        assert int(counts.sum()) == routed * config["top_k"] == int(layer.assignments)


@given(data=st.data())
def test_finite_inputs_give_finite_outputs_counts_and_gradients(data):
    layer, config = data.draw(layers())
    x, mask = data.draw(inputs(config["dim"], config["dtype"]))
    x.requires_grad_(True)
    out = layer(x, padding_mask=mask)
    assert out.shape == x.shape and out.dtype == config["dtype"]
    assert torch.isfinite(out).all()
    routed = int(x.shape[:-1].numel() if mask is None else (~mask).sum())
    _check_counts(layer, config, routed)
    if mask is not None and config["num_shared_experts"] == 0:
        assert (out[mask] == 0).all()  # padded tokens are not routed
    loss = out.float().square().mean() if out.numel() else out.sum()
    (loss + layer.aux_loss).backward()
    assert torch.isfinite(layer.aux_loss) and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@given(data=st.data(), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       check_finite=st.booleans())
def test_non_finite_tokens_stay_their_own_or_raise_floating_point_error(data, bad, check_finite):
    layer, config = data.draw(layers())
    layer.check_finite = check_finite
    x, mask = data.draw(inputs(config["dim"], config["dtype"]))
    tokens = x.reshape(-1, config["dim"])
    if tokens.shape[0] == 0:
        return
    poisoned = data.draw(st.lists(st.integers(0, tokens.shape[0] - 1), min_size=1, max_size=tokens.shape[0]))
    tokens[poisoned, data.draw(st.integers(0, config["dim"] - 1))] = bad
    try:
        out = layer(x, padding_mask=mask)
    except FloatingPointError as err:
        assert check_finite and "not finite" in str(err)
        return
    assert out.shape == x.shape
    clean = torch.isfinite(tokens).all(-1)
    if mask is not None:
        clean |= mask.reshape(-1)  # padded tokens are never routed: their routed output is 0, finite or not
    if config["router"] == "token_choice" and config["num_shared_experts"] == 0:
        # NaN/inf stays in the tokens that carry it: every other token's output is finite.
        assert torch.isfinite(out.reshape(-1, config["dim"])[clean]).all()
    _check_counts(layer, config, int(x.shape[:-1].numel() if mask is None else (~mask).sum()))


@given(
    dim=st.integers(-2, 8), num_experts=st.integers(-1, 6), top_k=st.integers(-1, 7),
    capacity_factor=st.none() | st.floats(-1.0, 2.0), aux_loss_coef=st.floats(-1.0, 1.0),
    router_jitter=st.floats(-0.5, 1.5), router=st.sampled_from(["token_choice", "expert_choice", "other"]),
)
def test_bad_arguments_raise_value_error_only(dim, num_experts, top_k, capacity_factor, aux_loss_coef,
                                              router_jitter, router):
    try:
        layer = MoE(dim, num_experts, top_k, capacity_factor=capacity_factor, aux_loss_coef=aux_loss_coef,
                    router_jitter=router_jitter, router=router)
    except ValueError as err:
        assert "MoE:" in str(err)
        return
    assert layer(torch.randn(3, dim)).shape == (3, dim)


def test_every_token_on_one_expert():
    """All-equal logits and top_k=1: every token goes to the same expert (the tie's winner); with capacity, the
    overflow is dropped and counted, and the dropped tokens' routed output is zero."""
    layer = MoE(4, 4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
    x = torch.randn(8, 4)
    out = layer(x)
    assert sorted(layer.tokens_per_expert.tolist()) == [0, 0, 0, 8]
    assert int(layer.dropped_tokens) == 8 - 2  # capacity ceil(1.0 * 8 * 1 / 4) = 2
    assert (out.abs().sum(-1) > 0).sum() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_tokens(dtype):
    layer = MoE(4, 4, top_k=2, dtype=dtype)
    out = layer(torch.zeros(0, 3, 4, dtype=dtype, requires_grad=True))
    assert out.shape == (0, 3, 4) and int(layer.tokens_per_expert.sum()) == 0
    (out.sum() + layer.aux_loss).backward()
    assert torch.isfinite(layer.aux_loss)
