"""The MoE layer: fast path against the loop reference, capacity, losses, stats, errors, dtypes."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

from lightning_moe import MoE
from lightning_moe.nn import DispatchPlan, LocalDispatcher, find_moe_layers

from reference import reference_moe

ROUTING_OPTIONS = [
    dict(top_k=1),
    dict(top_k=2),
    dict(top_k=3, normalize_weights=False),
    dict(top_k=2, score_func="sigmoid"),
    dict(top_k=2, capacity_factor=0.5),
    dict(top_k=1, capacity_factor=1.0),
    dict(top_k=2, capacity_factor=1.25, score_func="sigmoid"),
    dict(top_k=2, router="expert_choice"),
    dict(top_k=1, router="expert_choice", capacity_factor=2.0),
    dict(top_k=2, num_shared_experts=2),
    dict(top_k=2, activation="swiglu"),
    dict(top_k=2, activation="relu", bias=True),
    dict(top_k=2, bias_update_rate=0.1),
    dict(top_k=2, expert=nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8))),
]


def _ids(option):
    return ",".join(f"{k}={'module' if isinstance(v, nn.Module) else v}" for k, v in option.items())


def _grads(layer, x):
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]
    return grads + [x.grad.clone()]


@pytest.mark.parametrize("option", ROUTING_OPTIONS, ids=[_ids(o) for o in ROUTING_OPTIONS])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_path_matches_reference_outputs_and_grads(option, padded):
    torch.manual_seed(0)
    layer = MoE(8, 4, **option).double()
    if option.get("bias_update_rate"):
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(3, 7, 8, dtype=torch.double, requires_grad=True)
    mask = torch.rand(3, 7) < 0.3 if padded else None

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


def test_padded_tokens_are_not_routed_and_output_zero():
    layer = MoE(8, 4, top_k=2)
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True
    y = layer(x, padding_mask=mask)
    assert int(layer.tokens_per_expert.sum()) == 6 * 2
    assert int(layer.routed_tokens) == 6
    assert torch.all(y[mask] == 0)


def test_capacity_drops_are_counted_and_deterministic():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, capacity_factor=0.5)
    x = torch.randn(40, 8)
    y1 = layer(x)
    cap = math.ceil(0.5 * 40 * 2 / 4)
    kept = torch.minimum(layer.tokens_per_expert, torch.tensor(cap)).sum()
    assert int(layer.tokens_per_expert.sum()) == 80  # counted before drops
    assert int(layer.dropped_tokens) == 80 - int(kept) > 0
    assert torch.equal(y1, layer(x))


def test_token_dropped_by_all_experts_outputs_zero():
    layer = MoE(4, 2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.zeros(4, 4)
    x[:, 0] = 1.0  # every token prefers expert 0, which has ceil(0.5*4/2) = 1 slot
    y = layer(x)
    assert int(layer.dropped_tokens) == 3
    assert torch.count_nonzero(y.abs().sum(-1)) == 1 and y[0].abs().sum() > 0


def test_dropless_never_drops():
    layer = MoE(8, 4, top_k=2)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0
    x = torch.randn(64, 8).abs()
    layer(x)
    assert int(layer.dropped_tokens) == 0
    assert int(layer.tokens_per_expert[0]) == 64


def test_load_balancing_loss_equals_coefficient_when_uniform():
    layer = MoE(8, 4, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # uniform probabilities; top-1 ties go to expert 0
    x = torch.randn(16, 8)
    layer(x)
    # P_i = 1/E for all i; sum_i f_i = 1, so E * sum f_i P_i = 1 whatever the counts.
    torch.testing.assert_close(layer.load_balancing_loss, torch.tensor(0.5))
    torch.testing.assert_close(layer.z_loss, torch.tensor(0.0))


def test_losses_match_their_definitions():
    torch.manual_seed(1)
    layer = MoE(8, 4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(32, 8)
    layer(x)
    logits = x @ layer.router.gate.weight.t()
    probs = logits.softmax(-1)
    ids = probs.topk(2, -1).indices
    f = torch.bincount(ids.reshape(-1), minlength=4).float() / (32 * 2)
    expected_balance = 0.1 * 4 * (f * probs.mean(0)).sum()
    expected_z = 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(layer.load_balancing_loss, expected_balance)
    torch.testing.assert_close(layer.z_loss, expected_z)
    torch.testing.assert_close(layer.aux_loss, expected_balance + expected_z)
    assert layer.aux_loss.requires_grad


def test_aux_loss_ignores_padding():
    torch.manual_seed(2)
    layer = MoE(8, 4, top_k=2)
    x = torch.randn(10, 8)
    layer(x[:6])
    unpadded = layer.aux_loss.detach().clone()
    mask = torch.tensor([False] * 6 + [True] * 4)
    layer(x, padding_mask=mask)
    torch.testing.assert_close(layer.aux_loss.detach(), unpadded)


def test_stats_are_buffers_without_grad_and_not_persistent():
    layer = MoE(8, 4)
    layer(torch.randn(5, 8))
    buffers = dict(layer.named_buffers())
    for name in ("tokens_per_expert", "dropped_tokens", "routed_tokens", "router_entropy"):
        assert name in buffers and not buffers[name].requires_grad
        assert name not in layer.state_dict()
    assert "router.expert_bias" in layer.state_dict()


def test_expert_bias_changes_choice_not_weights():
    torch.manual_seed(3)
    layer = MoE(8, 4, top_k=1, bias_update_rate=1.0, normalize_weights=False)
    x = torch.randn(20, 8)
    layer(x)
    probs = (x @ layer.router.gate.weight.t()).softmax(-1)
    layer.router.expert_bias.copy_(torch.tensor([100.0, 0, 0, 0]))
    layer.eval()
    y = layer(x)
    assert int(layer.tokens_per_expert[0]) == 20
    expert0 = layer.experts(x, [20, 0, 0, 0])
    torch.testing.assert_close(y, probs[:, :1] * expert0)  # raw probability, not the biased score


def test_update_expert_bias_moves_towards_balance():
    layer = MoE(8, 4, top_k=1, bias_update_rate=0.01)
    layer.update_expert_bias(torch.tensor([10, 0, 5, 5]))
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    layer(torch.randn(6, 8))
    before = layer.expert_bias.clone()
    layer.update_expert_bias()
    assert not torch.equal(before, layer.expert_bias)


def test_router_jitter_only_in_training():
    torch.manual_seed(4)
    layer = MoE(8, 4, router_jitter=0.5)
    x = torch.randn(30, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (8,), (2, 3, 4, 8)])
@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_any_leading_shape_including_empty(shape, router):
    layer = MoE(8, 4, router=router, num_shared_experts=1)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    (y.sum() + layer.aux_loss).backward()
    assert layer.router.gate.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_route_in_float32(dtype):
    torch.manual_seed(5)
    layer = MoE(16, 4).to(dtype)
    x = torch.randn(2, 9, 16, dtype=dtype)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, out: seen.update(logits=out.logits_TE.dtype))
    y = layer(x)
    assert y.dtype == dtype and seen["logits"] == torch.float32
    assert torch.isfinite(y).all()


def test_autocast_keeps_router_float32_and_experts_low_precision():
    layer = MoE(16, 4)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, out: seen.update(logits=out.logits_TE.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(10, 16))
    assert seen["logits"] == torch.float32
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_output_dtype_under_autocast_does_not_depend_on_token_count(router):
    # A rank without tokens must return what its peers return (expert parallelism exchanges these rows).
    layer = MoE(16, 4, router=router, num_shared_experts=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = {layer(torch.randn(n, 16)).dtype for n in (0, 5)}
    assert dtypes == {torch.bfloat16}


def test_nan_input_does_not_crash_or_misindex():
    layer = MoE(8, 4, top_k=2, capacity_factor=1.0)
    x = torch.randn(6, 8)
    x[2] = float("nan")
    y = layer(x)
    assert y.shape == x.shape
    assert 0 <= int(layer.tokens_per_expert.sum()) <= 12
    checked = MoE(8, 4, check_finite=True)
    checked.layer_name = "model.block3.moe"
    with pytest.raises(FloatingPointError, match="model.block3.moe"):
        checked(x)


def test_meta_device_builds_mixtral_sized_layer_instantly():
    start = time.perf_counter()
    with torch.device("meta"):
        layer = MoE(4096, 8, hidden_dim=14336, activation="swiglu")
    layer2 = MoE(4096, 8, hidden_dim=14336, activation="swiglu", device="meta")
    elapsed = time.perf_counter() - start
    for built in (layer, layer2):
        assert sum(p.numel() for p in built.experts.parameters()) == 3 * 4096 * 14336 * 8
        assert all(p.is_meta for p in built.parameters())
    assert elapsed < 5.0  # materialising 1.4e9 floats would take far longer than this and 5.6 GB


def test_constructor_arguments_are_readable():
    layer = MoE(8, 4, top_k=3, capacity_factor=1.5, aux_loss_coef=0.2, num_shared_experts=1)
    assert (layer.dim, layer.num_experts, layer.top_k, layer.hidden_dim) == (8, 4, 3, 32)
    assert (layer.capacity_factor, layer.aux_loss_coef, layer.num_shared_experts) == (1.5, 0.2, 1)


def test_template_experts_are_reinitialised_copies():
    template = nn.Linear(8, 8)
    layer = MoE(8, 3, expert=template)
    weights = [e.weight for e in layer.experts.experts]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], template.weight)


def test_seeded_reset_is_per_global_expert():
    full = MoE(8, 4)
    full.experts.reset_parameters(seed=7)
    half = MoE(8, 2)
    half.experts.expert_offset = 2
    half.experts.reset_parameters(seed=7)
    torch.testing.assert_close(half.experts.w1, full.experts.w1[2:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0, num_experts=4), "dim=0"),
        (dict(dim=8, num_experts=0), "num_experts=0"),
        (dict(dim=8, num_experts=4, top_k=0), "top_k=0"),
        (dict(dim=8, num_experts=4, top_k=5), "top_k=5 must be <= num_experts=4"),
        (dict(dim=8, num_experts=4, hidden_dim=-1), "hidden_dim=-1"),
        (dict(dim=8, num_experts=4, capacity_factor=0.0), "capacity_factor=0.0"),
        (dict(dim=8, num_experts=4, capacity_factor=-1.0), "capacity_factor=-1.0"),
        (dict(dim=8, num_experts=4, activation="tanh"), "activation='tanh'"),
        (dict(dim=8, num_experts=4, router="hash"), "router='hash'"),
        (dict(dim=8, num_experts=4, score_func="relu"), "score_func='relu'"),
        (dict(dim=8, num_experts=4, aux_loss_coef=-0.1), "aux_loss_coef=-0.1"),
        (dict(dim=8, num_experts=4, z_loss_coef=-1), "z_loss_coef=-1"),
        (dict(dim=8, num_experts=4, bias_update_rate=-1), "bias_update_rate=-1"),
        (dict(dim=8, num_experts=4, router_jitter=-0.1), "router_jitter=-0.1"),
        (dict(dim=8, num_experts=4, num_shared_experts=-1), "num_shared_experts=-1"),
        (dict(dim=8, num_experts=4, router="expert_choice", bias_update_rate=0.1), "bias_update_rate"),
        (dict(dim=8, num_experts=4, expert="mlp"), "expert=str"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(**kwargs)


def test_bad_forward_inputs():
    layer = MoE(8, 4)
    with pytest.raises(ValueError, match="last dim 6 must equal dim=8"):
        layer(torch.randn(3, 6))
    with pytest.raises(ValueError, match="floating point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask shape"):
        layer(torch.randn(2, 3, 8), padding_mask=torch.zeros(3, 2, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_grouped_gemm_matches_loop():
    torch.manual_seed(0)
    layer = MoE(64, 8, hidden_dim=128).cuda().bfloat16()
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    y_fast = layer(x)
    counts = layer.tokens_per_expert.tolist()
    xs = torch.randn(sum(counts), 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer.experts(xs, counts), layer.experts._forward_loop(xs, counts), atol=2e-2, rtol=2e-2)
    assert y_fast.dtype == torch.bfloat16


class RecordingDispatcher:
    """An ExpertDispatcher that runs locally and records what the layer asked of it."""

    def __init__(self):
        self.local, self.host_counts, self.plans = LocalDispatcher(), [], []

    def plan(self, kept_counts_E, host_counts=None):
        self.host_counts.append(host_counts)
        self.plans.append(self.local.plan(kept_counts_E, host_counts))
        return self.plans[-1]

    def __call__(self, x_MD, plan, experts):
        assert plan is self.plans[-1] and x_MD.shape[0] == plan.num_sent
        return self.local(x_MD, plan, experts)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_forward_plans_then_dispatches_through_the_installed_dispatcher(router):
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, router=router)
    assert isinstance(layer.dispatcher, LocalDispatcher) and layer.expert_dispatcher is None
    x = torch.randn(6, 8)
    expected = layer(x)
    recorder = RecordingDispatcher()
    layer.expert_dispatcher = recorder
    assert layer.expert_dispatcher is recorder and layer.dispatcher is recorder
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # Expert choice knows its counts (its capacity) on the host: the plan needs no sync of them.
    capacity = layer.router.capacity(6) if router == "expert_choice" else None
    assert recorder.host_counts == [None if capacity is None else [capacity] * 4]
    layer.expert_dispatcher = None
    assert isinstance(layer.dispatcher, LocalDispatcher) and layer.expert_dispatcher is None


def test_a_dispatcher_must_implement_the_protocol():
    layer = MoE(8, 4)
    with pytest.raises(ValueError, match="must implement the ExpertDispatcher protocol"):
        layer.expert_dispatcher = lambda x, counts, experts: experts(x, counts.tolist())


def test_dispatch_plan_splits_counts_by_rank_and_local_expert():
    # 2 ranks, 2 local experts each; this rank sends [1, 2 | 3, 0] and receives [4, 0] from rank 0, [1, 5] from 1.
    received_PL = torch.tensor([[4, 0], [1, 5]])
    plan = DispatchPlan.from_counts([1, 2, 3, 0], received_PL.reshape(-1).tolist(), received_PL)
    assert plan.send_counts == (1, 2, 3, 0)
    assert plan.input_splits == (3, 3) and plan.output_splits == (4, 6)
    assert plan.local_counts == (5, 5)
    assert (plan.num_sent, plan.num_received) == (6, 10)
    with pytest.raises(ValueError, match="one count per expert"):
        DispatchPlan.from_counts([1, 2, 3], [4, 0, 1, 5], received_PL)


@pytest.mark.parametrize("router, per_token", [("token_choice", 2), ("expert_choice", 1)])
def test_forward_count_and_assignments(router, per_token):
    layer = MoE(8, 4, top_k=2, router=router)
    assert layer.forward_count == 0
    padding = torch.tensor([False, False, True, False, False])
    layer(torch.randn(5, 8), padding_mask=padding)
    layer(torch.randn(5, 8), padding_mask=padding)
    assert layer.forward_count == 2
    assert int(layer.assignments) == 4 * per_token  # the unit dropped_tokens counts
    assert copy.deepcopy(layer).forward_count == 0  # a copy starts as a fresh layer (aux_loss reads 0)


def test_find_moe_layers_is_the_one_finder():
    import lightning_moe.distributed

    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(8, 8), MoE(8, 2)), "b": MoE(8, 4)})
    found = find_moe_layers(model)
    assert [(path, layer.num_experts) for path, layer in found] == [("a.1", 2), ("b", 4)]
    assert find_moe_layers(model["b"]) == [("", model["b"])]
    assert lightning_moe.distributed.find_moe_layers is find_moe_layers
