"""int8 quantization and low-rank factorization of experts: savings, error bounds, callbacks."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE
from lightning_moe.callbacks.compression import ExpertQuantization, LowRankExperts
from lightning_moe.compress import (
    LowRankGroupedExperts,
    QuantizedGroupedExperts,
    low_rank_experts,
    low_rank_factors,
    module_bytes,
    quantize_experts,
    quantize_per_channel,
)
from lightning_moe.nn.experts import GroupedExperts

from launch import run_script

DIM = 32


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


class TwoLayerMoE(nn.Module):
    def __init__(self, activation: str = "gelu", bias: bool = False, shared: int = 1):
        super().__init__()
        self.moe1 = MoE(DIM, 8, top_k=2, hidden_dim=64, activation=activation, bias=bias, num_shared_experts=shared)
        self.moe2 = MoE(DIM, 4, top_k=1, hidden_dim=64, activation=activation, bias=bias)

    def forward(self, x):
        x = x + self.moe1(x)
        return x + self.moe2(x)


# -- quantization --------------------------------------------------------------------------------


def test_quantize_per_channel_error_is_within_half_a_step():
    w = torch.randn(3, 16, 24) * torch.logspace(-2, 1, 24)  # output channels of very different scale
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == (3, 24, 16) and scale.shape == (3, 24)
    assert int(q.abs().max()) == 127
    deq = (q.float() * scale[..., None]).transpose(1, 2)
    assert ((deq - w).abs() <= scale[:, None, :] / 2 + 1e-7).all()
    zero_q, zero_scale = quantize_per_channel(torch.zeros(1, 4, 2))
    assert (zero_q == 0).all() and torch.isfinite(zero_scale).all()


@pytest.mark.parametrize("activation,bias", [("gelu", False), ("swiglu", False), ("relu", True)])
def test_quantized_bank_matches_dense_within_two_percent(activation, bias):
    torch.manual_seed(0)
    dense = GroupedExperts(6, DIM, 64, activation, bias=bias)
    if bias:
        with torch.no_grad():
            dense.b1.normal_()
            dense.b2.normal_()
    dense.expert_offset = 6
    counts = [5, 0, 9, 3, 7, 8]
    x = torch.randn(sum(counts), DIM)
    quant = QuantizedGroupedExperts.from_float(dense)
    assert quant.num_experts == 6 and quant.expert_offset == 6
    assert not list(quant.parameters())
    ref = dense(x, counts)
    assert _rel_err(quant(x, counts), ref) < 0.02
    # reference path: the dense bank holding the dequantized weights gives the same outputs
    deq = copy.deepcopy(dense)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            if getattr(deq, name) is not None:
                getattr(deq, name).copy_(quant.dequantize(name))
    torch.testing.assert_close(quant(x, counts), deq(x, counts), rtol=1e-5, atol=1e-5)
    # the int8 GEMM kernel agrees with the dequantize path
    quant.kernel = "int8_mm"
    torch.testing.assert_close(quant(x, counts), deq(x, counts), rtol=1e-4, atol=1e-4)
    assert quant(x[:0], [0] * 6).shape == (0, DIM)


def test_quantize_experts_saves_4x_and_keeps_output_error_below_two_percent():
    torch.manual_seed(0)
    model = TwoLayerMoE()
    x = torch.randn(4, 16, DIM)
    ref = model(x)
    banks_before = {n: module_bytes(m) for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    router_before = model.moe1.router.gate.weight.detach().clone()

    report = quantize_experts(model)

    assert [layer.name for layer in report.layers] == ["moe1.experts", "moe1.shared_experts", "moe2.experts"]
    assert report.bytes_before == sum(banks_before.values())
    assert report.bytes_after == sum(module_bytes(m) for m in model.modules()
                                     if isinstance(m, QuantizedGroupedExperts))
    assert 3.5 < report.ratio < 4.0, report.ratio
    assert isinstance(model.moe1.experts, QuantizedGroupedExperts) and model.moe1.experts.num_experts == 8
    assert torch.equal(model.moe1.router.gate.weight, router_before)  # routers untouched
    assert _rel_err(model(x), ref) < 0.02
    assert str(report).startswith("int8 weight-only")
    # idempotent: nothing left to quantize
    assert quantize_experts(model).layers == []


def test_quantized_state_dict_round_trips_into_a_quantized_fresh_model():
    torch.manual_seed(0)
    model = TwoLayerMoE(shared=0)
    quantize_experts(model)
    fresh = TwoLayerMoE(shared=0)
    quantize_experts(fresh)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(10, DIM)
    torch.testing.assert_close(fresh(x), model(x))


def test_quantize_bf16_model_halves_expert_bytes():
    torch.manual_seed(0)
    model = TwoLayerMoE(shared=0).to(torch.bfloat16)
    x = torch.randn(64, DIM, dtype=torch.bfloat16)
    ref = model(x)
    report = quantize_experts(model)
    y = model(x)
    assert y.dtype == torch.bfloat16
    assert 1.75 < report.ratio < 2.0
    assert _rel_err(y, ref) < 0.03  # bf16 rounding of the reference itself is ~0.4%


def test_template_experts_are_left_alone_with_a_warning():
    layer = MoE(DIM, 4, expert=nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, DIM)))
    with pytest.warns(UserWarning, match="TemplateExperts"):
        report = quantize_experts(layer)
    assert report.layers == []


def test_invalid_compression_arguments():
    with pytest.raises(ValueError, match="bits=4"):
        quantize_experts(TwoLayerMoE(), bits=4)
    with pytest.raises(ValueError, match="kernel"):
        quantize_experts(TwoLayerMoE(), kernel="fp8")
    with pytest.raises(ValueError, match="energy"):
        low_rank_experts(TwoLayerMoE(), energy=1.5)
    with pytest.raises(ValueError, match="rank"):
        low_rank_experts(TwoLayerMoE(), rank=0)
    with pytest.raises(ValueError, match="apply_on"):
        ExpertQuantization(apply_on="epoch_end")
    with pytest.raises(ValueError, match="energy"):
        LowRankExperts(energy=0.0)


# -- low rank ------------------------------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_low_rank_factors_keep_energy_and_bound_the_error(energy):
    torch.manual_seed(0)
    w = torch.randn(5, 48, 64) @ torch.diag(torch.logspace(0, -2, 64))  # decaying spectrum
    a, b, kept = low_rank_factors(w, energy=energy)
    rank = a.shape[-1]
    assert (kept >= energy - 1e-6).all()
    err = (a @ b - w).norm(dim=(1, 2)) / w.norm(dim=(1, 2))
    assert (err <= math.sqrt(1 - energy) + 1e-5).all(), err
    # the rank is the smallest that keeps the energy for the most demanding expert
    if rank > 1:
        _, _, smaller_kept = low_rank_factors(w, rank=rank - 1)
        assert (smaller_kept < energy).any()


def test_low_rank_experts_exact_for_low_rank_weights_and_reports_saving():
    torch.manual_seed(0)
    model = TwoLayerMoE(activation="swiglu", shared=0)
    true_rank = 3
    with torch.no_grad():
        for layer in (model.moe1, model.moe2):
            for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
                e, i, o = w.shape
                w.copy_(torch.randn(e, i, true_rank) @ torch.randn(e, true_rank, o) / 10)
    x = torch.randn(3, 20, DIM)
    ref = model(x)
    report = low_rank_experts(model, energy=0.999)
    assert all(layer.detail == {"w1": 3, "w2": 3, "w3": 3} for layer in report.layers)
    expected_before = 3 * (8 + 4) * DIM * 64
    expected_after = 3 * (8 + 4) * true_rank * (DIM + 64)
    assert (report.params_before, report.params_after) == (expected_before, expected_after)
    assert report.bytes_before / report.bytes_after == pytest.approx(expected_before / expected_after)
    assert isinstance(model.moe1.experts, LowRankGroupedExperts)
    assert _rel_err(model(x), ref) < 1e-4


def test_low_rank_random_experts_error_bound_and_dense_fallback():
    torch.manual_seed(0)
    layer = MoE(DIM, 4, top_k=2, hidden_dim=128)
    dense = copy.deepcopy(layer.experts)
    report = low_rank_experts(layer, energy=0.9)
    low = layer.experts
    for name in ("w1", "w2"):
        w, approx = getattr(dense, name), low.weight(name)
        err = (approx - w).norm(dim=(1, 2)) / w.norm(dim=(1, 2))
        assert (err <= math.sqrt(1 - 0.9) + 1e-5).all()
        assert low.kept_energy[name] >= 0.9 - 1e-6
    assert report.params_after < report.params_before
    # energy=1 needs full rank: factoring would not save, so the weights stay dense and exact
    full = MoE(DIM, 4, top_k=2, hidden_dim=128)
    x = torch.randn(16, DIM)
    ref = full(x)
    report_full = low_rank_experts(full, energy=1.0)
    assert report_full.layers[0].detail == {"w1": "dense", "w2": "dense"}
    assert report_full.params_after == report_full.params_before
    torch.testing.assert_close(full(x), ref)


def test_low_rank_experts_are_trainable_and_fixed_rank():
    torch.manual_seed(0)
    layer = MoE(DIM, 4, top_k=2, hidden_dim=64, bias=True)
    report = low_rank_experts(layer, rank=4)
    assert report.layers[0].detail == {"w1": 4, "w2": 4}
    assert layer.experts.w1_a.shape == (4, DIM, 4) and layer.experts.w1_b.shape == (4, 4, 64)
    layer(torch.randn(32, DIM)).pow(2).mean().backward()
    grads = {n: p.grad for n, p in layer.experts.named_parameters()}
    assert set(grads) == {"w1_a", "w1_b", "w2_a", "w2_b", "b1", "b2"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


# -- callbacks -----------------------------------------------------------------------------------


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TwoLayerMoE(shared=0)
        self.head = nn.Linear(DIM, 1)
        self.test_banks: list[type] = []

    def forward(self, x):
        return self.head(self.net(x)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y) + self.net.moe1.aux_loss + self.net.moe2.aux_loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_banks.append(type(self.net.moe1.experts))
        self.log("test_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, DIM, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3].sum(-1)), batch_size=16)


def _trainer(callbacks):
    return pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


@pytest.mark.parametrize("callback", [ExpertQuantization(), LowRankExperts(rank=8)], ids=["int8", "lowrank"])
def test_compression_callback_applies_before_test(callback):
    torch.manual_seed(0)
    model = TinyModule()
    trainer = _trainer([callback])
    trainer.fit(model, _loader())
    assert isinstance(model.net.moe1.experts, GroupedExperts)  # fit trained the dense experts
    uncompressed = copy.deepcopy(model)
    with torch.no_grad():
        x, y = next(iter(_loader()))
        loss_before = F.mse_loss(uncompressed(x), y).item()
    trainer.test(model, _loader())
    expected = QuantizedGroupedExperts if isinstance(callback, ExpertQuantization) else LowRankGroupedExperts
    assert model.test_banks and set(model.test_banks) == {expected}
    assert callback.report is not None and callback.report.bytes_after < callback.report.bytes_before
    assert math.isfinite(trainer.callback_metrics["test_loss"].item()) and loss_before > 0


def test_quantization_callback_on_fit_end_and_test_measures_the_compressed_model():
    torch.manual_seed(0)
    model = TinyModule()
    callback = ExpertQuantization(apply_on="fit_end")
    trainer = _trainer([callback])
    trainer.fit(model, _loader())
    assert isinstance(model.net.moe2.experts, QuantizedGroupedExperts)
    assert callback.report.ratio > 3.5
    x, y = next(iter(_loader()))
    with torch.no_grad():
        expected = F.mse_loss(model(x), y)
    result = trainer.test(model, DataLoader(TensorDataset(x, y), batch_size=64), verbose=False)
    assert result[0]["test_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_layer_can_be_deep_copied_after_a_training_forward():
    # regression: the last forward's aux-loss graph made copy.deepcopy(model) raise after training
    layer = MoE(DIM, 4, top_k=2)
    layer(torch.randn(8, DIM, requires_grad=True))
    assert layer.aux_loss.grad_fn is not None
    clone = copy.deepcopy(layer)
    assert clone.aux_loss.item() == 0.0 and layer.aux_loss.grad_fn is not None
    x = torch.randn(5, DIM)
    torch.testing.assert_close(clone(x), layer(x))


@pytest.mark.slow
def test_compress_experts_example_smoke(tmp_path):
    script = Path(__file__).resolve().parent.parent / "examples" / "compress_experts.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--log-dir", str(tmp_path / "logs")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 11  # header + 10 methods
    assert any(line.startswith("| int8 experts") for line in table)


@pytest.mark.distributed
@pytest.mark.slow
def test_compression_callbacks_under_expert_parallelism(tmp_path):
    """strategy="moe" on 2 processes: each rank compresses its 4 of 8 experts before test; the test loss is the
    single-process compressed model's, and after test every rank holds the full compressed model."""
    ranks = run_script("compression_ep.py", out=tmp_path, ranks=2).results
    for result in ranks:
        for name, bank in (("int8", "QuantizedGroupedExperts"), ("lowrank", "LowRankGroupedExperts")):
            row = result[name]
            assert row["bank"] == bank and row["num_experts"] == 8 and row["same_outputs"]
            assert row["test_loss"] == pytest.approx(row["expected"], rel=1e-5)
        # the compressed shard held 4 experts: half the single-process report's elements
        assert result["int8"]["local_report"] == 4 * (2 * DIM * 64 + 64 + DIM)


@pytest.mark.parametrize("compress", ["quantize", "low_rank"])
def test_compression_refuses_gpt_oss_swiglu(compress):
    # GPT-OSS's clamped SwiGLU (with its up-projection bias) is not what the compressed banks compute:
    # refuse instead of silently gating with plain SiLU.
    from lightning_moe.compress import low_rank_experts, quantize_experts

    model = nn.Sequential(MoE(dim=16, num_experts=4, hidden_dim=32, activation="swiglu_oai", bias=True))
    with pytest.raises(ValueError, match="activation='swiglu_oai' are not supported"):
        quantize_experts(model) if compress == "quantize" else low_rank_experts(model, rank=4)
