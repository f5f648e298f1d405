"""The fused hot-path pieces (lightning_moe/nn/ops) against their references: values, gradients, saved tensors.

No timings here (benchmarks/ measures them): these tests say the fast paths compute what the readable ones do,
free what they should when they should, and go through autograd's saved-tensor hooks like any other op.
"""

from __future__ import annotations

import copy
import gc
import json
import pickle
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lightning_moe import MoE, _compat
from lightning_moe.nn import LocalDispatcher
from lightning_moe.nn import experts as experts_module
from lightning_moe.nn.experts import GroupedExperts
from lightning_moe.nn.ops import (
    expert_kernels,
    grouped_mlp,
    grouped_mlp_reference,
    routed_mlp,
    routed_mlp_reference,
    weighted_combine,
    weighted_combine_reference,
)

D, H = 6, 10
ACTIVATIONS = ["gelu", "relu", "silu", "swiglu"]


def _weights(experts: int, activation: str, bias: bool, dtype=torch.float64) -> list:
    torch.manual_seed(1)

    def param(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    return [param(experts, D, H), param(experts, H, D), param(experts, D, H) if activation == "swiglu" else None,
            param(experts, H) if bias else None, param(experts, D) if bias else None]


def _grads(tensors) -> list:
    out = [t.grad.clone() if t is not None and t.grad is not None else None for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


def _assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)


GROUPED_MM_MACS = experts_module.CPU_GROUPED_MM_MACS  # the package's threshold (the fixture below zeroes it)


@pytest.fixture(autouse=True)
def _fused_path(monkeypatch):
    """Layers here take the fused loop, whatever their size (small CPU experts otherwise take torch's grouped
    GEMM: tested in test_cpu_grouped_gemm_path_matches_the_fused_path)."""
    monkeypatch.setattr(experts_module, "CPU_GROUPED_MM_MACS", 0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mlp_matches_reference_values_and_grads(activation, bias):
    weights = _weights(4, activation, bias)
    counts = [3, 0, 5, 1]  # an expert without rows: its weight gradients are zeros, not missing
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (grouped_mlp, grouped_mlp_reference):
        y = fn(x, counts, *weights, activation=activation)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append((y.detach(), _grads([x, *weights])))
    torch.testing.assert_close(results[0][0], results[1][0])
    _assert_all_close(results[0][1], [g if g is not None or t is None else torch.zeros_like(t)
                                      for g, t in zip(results[1][1], [x, *weights], strict=True)])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("counts_as_tensor", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 5])  # experts grouped (default: all here), one a group, mixed
def test_routed_mlp_matches_reference_values_and_grads(activation, bias, counts_as_tensor, chunk_rows, monkeypatch):
    if chunk_rows is not None:
        monkeypatch.setattr(expert_kernels, "CHUNK_ELEMENTS", chunk_rows * D)
    weights = _weights(3, activation, bias)
    num_tokens, counts = 7, [4, 0, 5]
    # Rows grouped by expert, a token at most once per expert; token 6 gets no row; 2 dropped rows at the end.
    token_N = torch.tensor([0, 2, 3, 5, 0, 1, 2, 4, 5, 3, 6])
    x = torch.randn(num_tokens, D, dtype=torch.float64, requires_grad=True)
    w_N = torch.rand(token_N.shape[0], dtype=torch.float32, requires_grad=True)
    results = []
    for fn in (routed_mlp, routed_mlp_reference):
        c = torch.tensor(counts) if counts_as_tensor else counts
        out = fn(x, token_N, w_N, c, *weights, activation=activation)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), _grads([x, w_N, *weights])))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][0][6].abs().sum() == 0
    want = [g if g is not None or t is None else torch.zeros_like(t)
            for g, t in zip(results[1][1], [x, w_N, *weights], strict=True)]
    _assert_all_close(results[0][1], want)
    assert results[0][1][1].dtype == torch.float32 and results[0][1][1][-2:].abs().sum() == 0  # dropped rows


def test_weighted_combine_matches_reference_values_and_grads():
    torch.manual_seed(0)
    y = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, dtype=torch.float32, requires_grad=True)
    token = torch.tensor([0, 3, 3, 1, 0, 4, 4, 4, 2])
    results = []
    for fn in (weighted_combine, weighted_combine_reference):
        out = fn(y, w, token, num_tokens=6)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), _grads([y, w])))
    torch.testing.assert_close(results[0][0], results[1][0])
    _assert_all_close(results[0][1], results[1][1])


def test_no_rows_still_gives_every_weight_a_zero_gradient():
    weights = _weights(2, "gelu", bias=True)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    out = routed_mlp(x, torch.tensor([0, 1]), torch.ones(2), [0, 0], *weights)
    assert out.shape == (3, D) and out.abs().sum() == 0
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() == 0 for t in weights if t is not None)


def test_frozen_experts_get_no_gradient_and_inputs_still_do():
    weights = [t.detach() if t is not None else None for t in _weights(2, "swiglu", bias=False)]
    x = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    grouped_mlp(x, [1, 3], *weights, activation="swiglu").sum().backward()
    expected = torch.autograd.grad(grouped_mlp_reference(x, [1, 3], *weights, activation="swiglu").sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("fused", [grouped_mlp, routed_mlp])
def test_a_second_backward_through_one_forward_raises(fused):
    weights = _weights(2, "gelu", bias=False)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    args = (x, [1, 2]) if fused is grouped_mlp else (x, torch.tensor([0, 1, 2]), torch.ones(3), [1, 2])
    out = fused(*args, *weights)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.sum().backward()


class _Holder:
    def __init__(self, tensor):
        self.tensor = tensor


@pytest.mark.parametrize("fused", [grouped_mlp, routed_mlp])
def test_activations_go_through_saved_tensor_hooks_and_die_expert_by_expert(fused):
    """Every activation is packed by the active hooks, and the backward drops each expert's before the next."""
    weights = _weights(3, "gelu", bias=False)
    counts = [2, 3, 2]
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    events: list[tuple[str, int]] = []

    def pack(t):
        holder = _Holder(t)
        if t.dim() == 2 and t.shape[-1] == H:  # the hidden activations (h and act(h)) of one expert
            rows = t.shape[0]
            weakref.finalize(holder, events.append, ("freed", rows))
        return holder

    def unpack(holder):
        if holder.tensor.dim() == 2 and holder.tensor.shape[-1] == H:
            events.append(("unpacked", holder.tensor.shape[0]))
        return holder.tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        if fused is grouped_mlp:
            out = grouped_mlp(x, counts, *weights)
        else:
            out = routed_mlp(x, torch.arange(sum(counts)), torch.ones(sum(counts)), counts, *weights)
    assert not events
    out.sum().backward()
    gc.collect()
    kinds = [kind for kind, _ in events]
    assert kinds.count("unpacked") == kinds.count("freed") == 2 * len(counts)
    # Experts run last first; the last expert's two activations are freed before the first one's are unpacked.
    assert kinds.index("freed") < len(kinds) - kinds[::-1].index("unpacked") - 1


def test_moe_under_checkpoint_matches_plain_backward():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=12, activation="swiglu").double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    plain = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    for got, want in zip([p.grad for p in layer.parameters()] + [x.grad], plain, strict=True):
        torch.testing.assert_close(got, want)


class _PassThrough:
    """A dispatcher that is not LocalDispatcher: the layer takes its generic path (gather, experts, combine)."""

    plan = LocalDispatcher.plan
    __call__ = LocalDispatcher.__call__


@pytest.mark.parametrize("option", [dict(), dict(capacity_factor=0.6), dict(router="expert_choice"),
                                    dict(activation="swiglu", bias=True), dict(activation="relu", padded=True)])
def test_fused_local_layer_matches_the_generic_dispatch_path(option):
    option = dict(option)
    padded = option.pop("padded", False)
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(MoE(8, 4, top_k=2, hidden_dim=12, **option).double())
    layers[1].expert_dispatcher = _PassThrough()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.rand(3, 5) < 0.3 if padded else None
    results = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        out = layer(xi, padding_mask=mask)
        (out.square().sum() + layer.aux_loss).backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    _assert_all_close(results[0], results[1])
    torch.testing.assert_close(layers[0].tokens_per_expert, layers[1].tokens_per_expert)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("template", [False, True])
def test_local_layer_runs_its_experts_through_its_dispatcher(router, template):
    """The fused local path is the LocalDispatcher's: the layer never goes around its dispatcher."""
    calls = []

    class Counting(LocalDispatcher):
        def routed(self, *args, **kwargs):
            calls.append(type(args[4]).__name__)
            return super().routed(*args, **kwargs)

    expert = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.Linear(12, 8)) if template else None
    layer = MoE(8, 4, top_k=2, hidden_dim=12, router=router, expert=expert)
    layer.dispatcher = Counting()
    layer(torch.randn(5, 8)).sum().backward()
    assert calls == ["TemplateExperts" if template else "GroupedExperts"]


def test_fused_experts_under_autocast_match_the_loop_in_bfloat16():
    torch.manual_seed(0)
    layer = MoE(16, 4, top_k=2, hidden_dim=32)
    x = torch.randn(40, 16)
    counts = [10, 0, 20, 10]
    xs = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        fused, loop = layer.experts(xs, counts), layer.experts._forward_loop(xs, counts)
    assert y.dtype == fused.dtype == loop.dtype == torch.bfloat16
    torch.testing.assert_close(fused, loop, atol=2e-2, rtol=2e-2)


def test_fused_layer_runs_in_inference_mode_and_saves_nothing():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=12)
    x = torch.randn(10, 8)
    expected = layer(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)
    packed = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        layer(x)
    assert not packed


GPU_CHECK = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_check_says_there_is_no_gpu_and_exits_2():
    proc = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


@pytest.mark.slow
def test_gpu_check_runs_every_part_at_toy_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--cpu-smoke", "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {"layer", "floor", "layer / floor"} <= results["layer"].keys()
    assert results["lm_example"]["tokens_per_second"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fused kernels; the grouped GEMM (bf16)
def test_layer_on_cuda_matches_the_cpu(dtype):
    torch.manual_seed(0)
    cpu = MoE(64, 8, top_k=2, hidden_dim=128, activation="swiglu")
    cuda = copy.deepcopy(cpu).to("cuda", dtype)
    x = torch.randn(256, 64)
    x_cuda = x.to("cuda", dtype).requires_grad_(True)
    x.requires_grad_(True)
    y, y_cuda = cpu(x), cuda(x_cuda)
    y.square().sum().backward()
    y_cuda.float().square().sum().backward()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # relative to the largest magnitude

    def close(got, want):
        assert (got.float().cpu() - want).abs().max() <= tolerance * want.abs().max().clamp_min(1e-6)

    close(y_cuda, y)
    close(x_cuda.grad, x.grad)
    for p, q in zip(cuda.parameters(), cpu.parameters(), strict=True):
        close(p.grad, q.grad)


def test_fused_local_path_runs_the_experts_forward_hooks():
    """Pruning's masks and FSDP's unsharding live in forward pre-hooks: the fused path must run them."""
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=12)
    seen = []
    layer.experts.register_forward_pre_hook(lambda module, args, kwargs: seen.append(len(args) + len(kwargs)),
                                            with_kwargs=True)
    x = torch.randn(6, 8, requires_grad=True)
    layer(x).sum().backward()
    assert len(seen) == 1
    # a bank with hooks is never read outside its call (the overlapped expert-parallel path then steps aside)
    assert layer.experts.fused_params(x) is None


def test_copies_and_meta_layers_count_their_own_forwards():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=12)
    layer(torch.randn(3, 8))
    for copy_ in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copy_.forward_count == 0 and layer.forward_count == 1
        copy_(torch.randn(3, 8))
        assert copy_.forward_count == 1 and layer.forward_count == 1
    with torch.device("meta"):  # the planner builds models on meta: the counter stays a CPU tensor
        meta = MoE(8, 4, top_k=2, hidden_dim=12)
    assert meta.forward_count == 0


@pytest.mark.parametrize("option", [dict(), dict(activation="swiglu"), dict(activation="swiglu_oai"),
                                    dict(capacity_factor=0.6), dict(router="expert_choice"), dict(padded=True),
                                    dict(num_experts=64)])
def test_cpu_grouped_gemm_path_matches_the_fused_path(option, monkeypatch):
    """Small CPU experts run as torch's grouped GEMM (one C++ loop over the groups): same values and gradients."""
    option = dict(option)
    padded, num_experts = option.pop("padded", False), option.pop("num_experts", 4)
    calls = []
    grouped_mm = _compat.grouped_mm
    monkeypatch.setattr(_compat, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    x = torch.randn(3, 5, 8)
    mask = torch.rand(3, 5) < 0.3 if padded else None
    results = []
    for macs in (GROUPED_MM_MACS, 0):  # grouped GEMM, then the fused loop
        monkeypatch.setattr(experts_module, "CPU_GROUPED_MM_MACS", macs)
        torch.manual_seed(0)
        layer = MoE(8, num_experts, top_k=2, hidden_dim=12, **option)
        xi = x.clone().requires_grad_(True)
        (layer(xi, padding_mask=mask).square().sum() + layer.aux_loss).backward()
        results.append([xi.grad] + [p.grad for p in layer.parameters()])
        assert bool(calls) == (macs > 0)
        calls.clear()
    _assert_all_close(results[0], results[1])


def test_cpu_grouped_gemm_takes_an_expanded_gradient(monkeypatch):
    """``bank(x, counts).sum().backward()`` sends a zero-stride gradient, which torch's grouped GEMM backward
    rejects ("Invalid strides/sizes"); the bank hands it a contiguous one."""
    monkeypatch.setattr(experts_module, "CPU_GROUPED_MM_MACS", GROUPED_MM_MACS)
    torch.manual_seed(0)
    bank = GroupedExperts(4, dim=8, hidden_dim=16, activation="swiglu")
    x = torch.randn(6, 8, requires_grad=True)
    bank(x, [1, 2, 0, 3]).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    bank._forward_loop(reference, [1, 2, 0, 3]).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


@pytest.mark.parametrize("macs", [GROUPED_MM_MACS, 0])
def test_routed_and_dispatched_rows_take_the_same_expert_kernel(macs, monkeypatch):
    """The local routed path and a dispatcher's rows (expert parallelism) choose the kernel by one rule on the
    kept rows, so they agree bit for bit on either kernel, rows dropped or not."""
    monkeypatch.setattr(experts_module, "CPU_GROUPED_MM_MACS", macs)
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(MoE(16, 8, top_k=2, hidden_dim=24, activation="swiglu", capacity_factor=0.7))
    layers[1].expert_dispatcher = _PassThrough()  # rows gathered, the bank's row form, then combined
    x = torch.randn(3, 5, 16)
    results = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.square().sum().backward()
        results.append([out, xi.grad, layer.experts.w1.grad])
    assert int(layers[0].dropped_tokens.sum()) > 0
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_grouped_gemm_output_takes_in_place_edits(monkeypatch):
    """The bank's output on the grouped GEMM path is an ordinary tensor (not a custom Function's view)."""
    monkeypatch.setattr(experts_module, "CPU_GROUPED_MM_MACS", GROUPED_MM_MACS)
    bank = GroupedExperts(4, dim=8, hidden_dim=16)
    x = torch.randn(6, 8, requires_grad=True)
    y = bank(x, [1, 2, 0, 3])
    y.mul_(2)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_misaligned_rows_take_the_same_kernel_in_both_forms(monkeypatch):
    """A view starting off a 16-byte boundary: the row form copies it for the grouped GEMM, as the routed form's
    gather does, so both still agree bit for bit."""
    monkeypatch.setattr(experts_module, "CPU_GROUPED_MM_MACS", GROUPED_MM_MACS)
    calls = []
    grouped_mm = _compat.grouped_mm
    monkeypatch.setattr(_compat, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    torch.manual_seed(0)
    bank = GroupedExperts(3, dim=8, hidden_dim=16)
    x = torch.randn(49)[1:].view(6, 8)
    rows = bank(x, [2, 2, 2])
    assert len(calls) == 2
    routed = bank.forward_routed(x, torch.arange(6), torch.ones(6), [2, 2, 2])
    assert len(calls) == 4 and torch.equal(rows, routed)
