"""RouterPrecision and NonFiniteGuard in real ``Trainer.fit`` runs (CPU, a few steps each)."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE
from lightning_moe.callbacks.precision import NonFiniteGuard, RouterPrecision

from launch import run_script

DIM = 16


class TinyMoEModel(pl.LightningModule):
    """Linear -> residual MoE -> linear head, regression; a plain LightningModule."""

    def __init__(self, num_experts: int = 8, top_k: int = 2, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.moe = MoE(DIM, num_experts, top_k, hidden_dim=32)
        self.head = nn.Linear(DIM, 1)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.seen: list[dict] = []

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.moe(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x).float().squeeze(-1), y.float()) + self.moe.aux_loss
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x).float().squeeze(-1), y.float()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def _data(n: int = 64, seed: int = 0, nan_batches: tuple[int, ...] = (), batch_size: int = 8):
    g = torch.Generator().manual_seed(seed)
    # bf16-representable inputs: a bf16-true run and a float32 run see exactly the same numbers
    x = torch.randn(n, DIM, generator=g).bfloat16().float()
    y = x[:, :4].sum(-1).tanh()
    for b in nan_batches:
        x[b * batch_size] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


class _DtypeProbe(pl.Callback):
    """Records dtypes seen while training: router weight and logits, expert weights, optimizer params."""

    def on_fit_start(self, trainer, pl_module):
        self.records = []
        self.logits_dtypes = []
        pl_module.moe.router.register_forward_hook(lambda m, i, out: self.logits_dtypes.append(out.logits_TE.dtype))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        gate = pl_module.moe.router.gate.weight
        self.records.append({
            "gate": gate.dtype,
            "expert_bias": pl_module.moe.router.expert_bias.dtype,
            "w1": pl_module.moe.experts.w1.dtype,
            "head": pl_module.head.weight.dtype,
            "gate_in_optimizer": any(p is gate for p in opt_params),
        })


def test_router_stays_float32_during_bf16_true_fit():
    torch.manual_seed(0)
    model = TinyMoEModel()
    gate_before = model.moe.router.gate.weight.detach().clone()
    probe = _DtypeProbe()
    _trainer(precision="bf16-true", max_steps=3, callbacks=[RouterPrecision(), probe]).fit(model, _data())

    assert len(probe.records) == 3 and probe.logits_dtypes
    for record in probe.records:
        assert record == {"gate": torch.float32, "expert_bias": torch.float32, "w1": torch.bfloat16,
                          "head": torch.bfloat16, "gate_in_optimizer": True}
    assert set(probe.logits_dtypes) == {torch.float32}
    # the float32 gate was trained (the optimizer holds it), and the cast before it lost nothing
    assert not torch.equal(model.moe.router.gate.weight, gate_before)
    assert model.moe.router.gate.weight.dtype == torch.float32


def test_without_router_precision_bf16_true_casts_the_router():
    torch.manual_seed(0)
    model = TinyMoEModel()
    probe = _DtypeProbe()
    _trainer(precision="bf16-true", max_steps=1, callbacks=[probe]).fit(model, _data())
    assert probe.records[0]["gate"] == torch.bfloat16
    assert probe.records[0]["expert_bias"] == torch.bfloat16


def test_router_precision_restores_exact_values_and_unwraps_plugin():
    torch.manual_seed(0)
    model = TinyMoEModel()
    model.moe.router.expert_bias.copy_(torch.linspace(-1e-3, 1e-3, 8) + 0.3)  # not bf16-representable
    bias_before = model.moe.router.expert_bias.clone()
    gate_before = model.moe.router.gate.weight.detach().clone()
    trainer = _trainer(precision="bf16-true", max_steps=1, callbacks=[RouterPrecision()])
    trainer.validate(model, _data())
    assert torch.equal(model.moe.router.expert_bias, bias_before)
    assert torch.equal(model.moe.router.gate.weight, gate_before)
    assert model.moe.experts.w1.dtype == torch.bfloat16
    assert "convert_module" not in vars(trainer.strategy.precision_plugin)


def _topk_ids(model: TinyMoEModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.moe.router(x).top_ids_TK.sort(-1).values


def test_float32_router_matches_float32_reference_more_closely_than_bf16_router():
    torch.manual_seed(0)
    init = TinyMoEModel(lr=0.05, momentum=0.0)
    runs = {}
    for name, precision, callbacks in (("ref", "32-true", []), ("fp32_router", "bf16-true", [RouterPrecision()]),
                                       ("bf16_router", "bf16-true", [])):
        model = copy.deepcopy(init)
        torch.manual_seed(1)
        _trainer(precision=precision, max_steps=32, callbacks=callbacks).fit(model, _data(n=256))
        runs[name] = model
    assert runs["fp32_router"].moe.router.gate.weight.dtype == torch.float32
    assert runs["bf16_router"].moe.router.gate.weight.dtype == torch.bfloat16
    # routing decisions of each trained router on the same (bf16-representable) router inputs
    x = torch.randn(4096, DIM, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    ids = {name: _topk_ids(model, x) for name, model in runs.items()}
    flips_fp32 = int((ids["fp32_router"] != ids["ref"]).any(-1).sum())
    flips_bf16 = int((ids["bf16_router"] != ids["ref"]).any(-1).sum())
    assert flips_bf16 >= 10 and flips_fp32 * 4 <= flips_bf16, (flips_fp32, flips_bf16)  # measured 0 vs 27
    # the float32 gate follows the reference's small updates; the bf16 gate rounds them away
    gate = {name: model.moe.router.gate.weight.detach().float() for name, model in runs.items()}
    dist_fp32 = (gate["fp32_router"] - gate["ref"]).norm()
    dist_bf16 = (gate["bf16_router"] - gate["ref"]).norm()
    assert dist_fp32 * 10 < dist_bf16, (dist_fp32, dist_bf16)


class _WeightTrace(pl.Callback):
    """Snapshots every parameter before and after each training batch."""

    def __init__(self):
        self.before, self.after = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_guard_skips_one_bad_step_and_training_continues():
    torch.manual_seed(0)
    # momentum and weight decay: zeroing the gradients would still move the weights on the bad step
    model = TinyMoEModel(weight_decay=0.01)
    guard, trace = NonFiniteGuard(max_consecutive=3), _WeightTrace()
    trainer = _trainer(max_epochs=1, callbacks=[guard, trace])
    with pytest.warns(UserWarning, match="skipped the optimizer step at global step 2"):
        trainer.fit(model, _data(nan_batches=(2,)))

    assert len(trace.after) == 8
    assert _same(trace.before[2], trace.after[2])  # the NaN batch left every weight as it was
    for step in (1, 3, 7):  # good steps before and after it trained
        assert not _same(trace.before[step], trace.after[step])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.skipped_steps == 1 and guard.consecutive == 0
    assert trainer.callback_metrics["moe/skipped_steps"].item() == 1.0


def test_non_finite_guard_stops_after_consecutive_skips_and_checkpoint_keeps_last_good_weights(tmp_path):
    torch.manual_seed(0)
    model = TinyMoEModel()
    guard, trace = NonFiniteGuard(max_consecutive=3), _WeightTrace()
    trainer = _trainer(max_epochs=1, callbacks=[guard, trace])
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row .* global step 4"):
        with pytest.warns(UserWarning):
            trainer.fit(model, _data(nan_batches=(2, 3, 4)))
    last_good = trace.after[1]
    assert {n: p for n, p in model.named_parameters()}.keys() == last_good.keys()
    assert _same({n: p.detach() for n, p in model.named_parameters()}, last_good)

    path = tmp_path / "last_good.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert _same({k: state[k] for k in last_good}, last_good)
    assert state["moe.experts.w1"].isfinite().all()


def test_non_finite_guard_skips_when_another_rank_is_non_finite(monkeypatch):
    torch.manual_seed(0)
    model = TinyMoEModel()
    guard, trace = NonFiniteGuard(max_consecutive=100), _WeightTrace()
    trainer = _trainer(max_steps=2, callbacks=[guard, trace])
    decisions = []

    def any_rank_bad(decision, all=True):  # a peer rank reports a non-finite gradient
        decisions.append((decision, all))
        return True

    monkeypatch.setattr(trainer.strategy, "reduce_boolean_decision", any_rank_bad)
    with pytest.warns(UserWarning, match="another rank"):
        trainer.fit(model, _data())
    assert decisions == [(False, False), (False, False)]
    assert _same(trace.before[0], trace.after[1])
    assert guard.skipped_steps == 2


def test_non_finite_guard_checks_the_loss_when_gradients_are_finite():
    torch.manual_seed(0)

    class InfLoss(TinyMoEModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            # a non-finite term without parameters: gradients stay finite, the loss does not
            return loss + (math.inf if batch_idx == 1 else 0.0)

    model, guard, trace = InfLoss(), NonFiniteGuard(), _WeightTrace()
    with pytest.warns(UserWarning, match="non-finite loss"):
        _trainer(max_steps=3, callbacks=[guard, trace]).fit(model, _data())
    assert _same(trace.before[1], trace.after[1])
    assert not _same(trace.before[2], trace.after[2])
    assert guard.skipped_steps == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_invalid_arguments(bad):
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=bad)
    with pytest.raises(ValueError, match="dtype"):
        RouterPrecision(dtype=torch.int8)


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_true_expert_parallel_float32_routers_and_all_ranks_skip_together(tmp_path):
    """strategy="moe" on 2 processes under bf16-true: routers float32, experts bf16; a non-finite loss on
    rank 1 alone (finite gradients everywhere) makes both ranks skip that step."""
    ranks = run_script("precision_ep.py", out=tmp_path, ranks=2).results
    for result in ranks:
        assert result["dtypes"] == {"gate": "torch.float32", "expert_bias": "torch.float32", "w1": "torch.bfloat16",
                                    "head": "torch.bfloat16", "gate_in_optimizer": "True"}
        assert result["logits"] == ["torch.float32"]
        assert result["skipped"] == 1
        assert result["unchanged"] == [False, False, True, False]
