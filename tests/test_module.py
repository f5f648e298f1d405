"""MoELightningModule: routing losses, bias balancing and logging with a real Trainer on tiny models."""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE, MoELightningModule

from launch import run_script

STATS = ("aux_loss", "z_loss", "dropped_fraction", "load_imbalance", "routing_entropy")


class Tiny(MoELightningModule):
    """Residual stack of MoE layers and a linear head; training_step returns only the task loss."""

    def __init__(self, dim: int = 8, num_experts: int = 4, top_k: int = 2, num_layers: int = 2, lr: float = 0.1,
                 optimizer: str = "sgd", aux_loss_coef: float = 1e-2, z_loss_coef: float = 1e-3,
                 bias_update_rate: float = 0.0, capacity_factor: float | None = None,
                 log_per_layer: bool | None = None) -> None:
        super().__init__(log_per_layer=log_per_layer)
        self.save_hyperparameters()
        self.layers = nn.ModuleList([
            MoE(dim, num_experts, top_k, hidden_dim=16, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                bias_update_rate=bias_update_rate, capacity_factor=capacity_factor)
            for _ in range(num_layers)
        ])
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x).squeeze(-1)

    def task_loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):
        return self.task_loss(batch)

    def configure_optimizers(self):
        cls = torch.optim.Adam if self.hparams.optimizer == "adam" else torch.optim.SGD
        return cls(self.parameters(), lr=self.hparams.lr)


def data(n: int = 32, dim: int = 8, batch_size: int = 8, seed: int = 0, offset: float = 0.0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x[:, 0] += offset
    return DataLoader(TensorDataset(x, torch.randn(n, generator=g)), batch_size=batch_size)


def trainer(**kwargs) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kwargs)
    return L.Trainer(**args)


class GradCapture(L.Callback):
    """Gradients and expert biases right before each optimizer step; biases after each batch."""

    def __init__(self):
        self.grads, self.biases = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.biases.append([layer.expert_bias.clone() for layer in pl_module.layers])


def hand_grads(model: Tiny, batches, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Gradients of (task loss + sum of the layers' aux losses), computed without the base class."""
    model.zero_grad()
    for batch in batches:
        loss = model.task_loss(batch) + sum(layer.aux_loss for layer in model.layers)
        (loss * scale).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_router_gradients_include_aux_loss():
    torch.manual_seed(0)
    big = Tiny(aux_loss_coef=10.0, z_loss_coef=1.0)
    zero = copy.deepcopy(big)
    for layer in zero.layers:
        layer.aux_loss_coef = layer.z_loss_coef = 0.0
    reference = copy.deepcopy(big)
    batch = next(iter(data()))

    grads = {}
    for name, model in (("big", big), ("zero", zero)):
        capture = GradCapture()
        trainer(callbacks=[capture]).fit(model, data())
        grads[name] = capture.grads[0]

    gate = "layers.0.router.gate.weight"
    assert not torch.allclose(grads["big"][gate], grads["zero"][gate], atol=1e-4)
    expected = hand_grads(reference, [batch])
    assert grads["big"].keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads["big"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_accumulation_scales_aux_and_balances_once_per_step():
    torch.manual_seed(1)
    model = Tiny(aux_loss_coef=5.0, bias_update_rate=0.1)
    reference = copy.deepcopy(model)
    batches = list(data())[:2]
    capture = GradCapture()
    trainer(callbacks=[capture], accumulate_grad_batches=2).fit(model, data())

    expected = hand_grads(reference, batches, scale=0.5)
    for name, grad in expected.items():
        torch.testing.assert_close(capture.grads[0][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    counts = [torch.zeros(4, dtype=torch.long) for _ in reference.layers]
    for batch in batches:  # biases are still zero for both micro-batches: same routing as the model's
        reference(batch[0])
        counts = [c + layer.tokens_per_expert for c, layer in zip(counts, reference.layers, strict=True)]
    assert len(capture.biases) == 2
    assert all(b.abs().sum() == 0 for b in capture.biases[0]), "bias must not move before the optimizer step"
    for bias, c in zip(capture.biases[1], counts, strict=True):
        torch.testing.assert_close(bias, 0.1 * torch.sign(c.float().mean() - c.float()))
        assert bias.abs().sum() > 0


def _routed_model(token_experts: list[int], capacity_factor: float | None = None, **kwargs) -> tuple[Tiny, DataLoader]:
    """One layer, 4 experts, top-1; token i is one-hot on expert token_experts[i]; lr=0 keeps routing fixed."""
    model = Tiny(dim=4, num_experts=4, top_k=1, num_layers=1, lr=0.0, capacity_factor=capacity_factor, **kwargs)
    with torch.no_grad():
        model.layers[0].router.gate.weight.copy_(10 * torch.eye(4))
    x = torch.eye(4)[token_experts]
    return model, DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=len(x))


def test_logged_keys_and_balanced_load_imbalance():
    model, loader = _routed_model([0, 1, 2, 3, 3, 2, 1, 0])
    t = trainer()
    t.fit(model, loader)
    metrics = t.callback_metrics
    for stat in STATS:
        assert f"moe/{stat}" in metrics and f"moe/{stat}_epoch" in metrics
    assert not any(k.startswith("moe/layer_") for k in metrics)
    assert metrics["moe/load_imbalance"].item() == pytest.approx(1.0)
    assert metrics["moe/dropped_fraction"].item() == 0.0
    layer = model.layers[0]
    layer(loader.dataset.tensors[0])  # lr=0: the same routing as in the step
    assert metrics["moe/aux_loss"].item() == pytest.approx(layer.aux_loss.item(), rel=1e-5)
    assert metrics["moe/z_loss"].item() == pytest.approx(layer.z_loss.item(), rel=1e-5)
    assert metrics["moe/routing_entropy"].item() == pytest.approx(layer.router_entropy.item(), rel=1e-5)


def test_skewed_load_imbalance_dropped_fraction_and_per_layer_keys():
    model, loader = _routed_model([0, 0, 0, 0, 0, 1, 2, 3], capacity_factor=1.0, log_per_layer=True)
    t = trainer()
    t.fit(model, loader)
    metrics = t.callback_metrics
    assert metrics["moe/load_imbalance"].item() == pytest.approx(2.5)  # loads 5,1,1,1: max 5 / mean 2
    assert metrics["moe/dropped_fraction"].item() == pytest.approx(3 / 8)  # 2 slots per expert
    for stat in STATS:
        assert f"moe/layer_0/{stat}" in metrics
    assert metrics["moe/layer_0/load_imbalance"].item() == pytest.approx(2.5)


class History(L.Callback):
    def __init__(self, key: str):
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(trainer.callback_metrics[self.key].item())


@pytest.mark.parametrize("rate", [0.0, 0.02])
def test_bias_balancing_lowers_load_imbalance(rate):
    torch.manual_seed(2)
    model = Tiny(num_layers=1, top_k=1, lr=0.0, bias_update_rate=rate)
    with torch.no_grad():  # a router that prefers expert 0 for tokens with a large feature 0
        model.layers[0].router.gate.weight[0, 0] = 1.0
    history = History("moe/load_imbalance")
    trainer(max_steps=40, callbacks=[history]).fit(model, data(n=320, batch_size=32, offset=3.0))
    first, last = history.values[0], sum(history.values[-5:]) / 5
    assert first > 2.0  # skewed stream
    if rate:
        assert last < 0.5 * first
        assert model.layers[0].expert_bias[0] < 0
    else:
        assert last > 0.9 * first  # nothing balances without the bias


class Outputs(L.Callback):
    def __init__(self):
        self.outputs, self.aux = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)
        self.aux.append(pl_module.moe_aux_loss().detach())


class DictStep(Tiny):
    def training_step(self, batch, batch_idx):
        loss = self.task_loss(batch)
        return {"loss": loss, "task": loss.detach()}


class NoneStep(Tiny):
    def training_step(self, batch, batch_idx):
        loss = self.task_loss(batch)
        self.task = loss.detach()
        return None if batch_idx % 2 else loss


def test_dict_return_gets_aux_added_to_loss():
    torch.manual_seed(3)
    capture = Outputs()
    trainer(max_steps=2, callbacks=[capture]).fit(DictStep(aux_loss_coef=1.0), data())
    for out, aux in zip(capture.outputs, capture.aux, strict=True):
        assert aux > 0
        torch.testing.assert_close(out["loss"], out["task"] + aux)


def test_none_return_stays_none():
    torch.manual_seed(4)
    model = NoneStep(aux_loss_coef=1.0)
    batch = next(iter(data()))
    assert model.training_step(batch, 1) is None
    torch.testing.assert_close(model.training_step(batch, 0), model.task + model.moe_aux_loss())
    capture = Outputs()
    trainer(max_steps=4, callbacks=[capture]).fit(model, data())
    assert [bool(out) for out in capture.outputs] == [True, False, True, False]


class ChildStep(Tiny):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 1.0


class Mixin:
    def training_step(self, batch, batch_idx):
        return self.task_loss(batch)


class MixedIn(Mixin, Tiny):
    pass


@pytest.mark.parametrize("cls", [ChildStep, MixedIn])
def test_aux_added_once_through_super_and_mixins(cls):
    torch.manual_seed(5)
    model = cls(aux_loss_coef=1.0)
    batch = next(iter(data()))
    loss = model.training_step(batch, 0)
    torch.testing.assert_close(loss, model.task_loss(batch) + model.moe_aux_loss())


class SkipsLayer(Tiny):
    def forward(self, x):
        layers = self.layers if self.global_step % 2 == 0 else self.layers[:1]
        for layer in layers:
            x = x + layer(x)
        self.ran_aux = sum(layer.aux_loss for layer in layers).detach()
        return self.head(x).squeeze(-1)


class AuxHistory(L.Callback):
    def __init__(self):
        self.logged, self.expected = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(trainer.callback_metrics["moe/aux_loss"].item())
        self.expected.append(pl_module.ran_aux.item())


def test_layer_skipped_in_a_step_adds_nothing():
    # Adding a skipped layer's stale aux loss would backward through a freed graph and raise.
    torch.manual_seed(6)
    model = SkipsLayer(aux_loss_coef=1.0)
    history = AuxHistory()
    trainer(max_steps=4, callbacks=[history]).fit(model, data())
    assert history.logged == pytest.approx(history.expected, rel=1e-6)
    assert history.expected[0] > history.expected[1]  # step 1 ran one layer


class ManualStep(Tiny):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        task = self.task_loss(batch)
        self.counts = self.layers[0].tokens_per_expert.clone()
        self.manual_backward(task + self.moe_aux_loss())
        opt.step()
        opt.zero_grad()
        self.bias_after_step = self.layers[0].expert_bias.clone()
        self.task = task.detach()
        return task


def test_manual_optimization_adds_nothing_and_balances_after_step():
    torch.manual_seed(7)
    model = ManualStep(bias_update_rate=0.1)
    capture = Outputs()
    trainer(max_steps=1, callbacks=[capture]).fit(model, data())
    torch.testing.assert_close(capture.outputs[0]["loss"], model.task)
    counts = model.counts.float()
    torch.testing.assert_close(model.bias_after_step, 0.1 * torch.sign(counts.mean() - counts))
    torch.testing.assert_close(model.layers[0].expert_bias, model.bias_after_step)  # updated once


class Evaluated(Tiny):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.task_loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.task_loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_validate_test_predict_add_nothing_but_record_stats():
    torch.manual_seed(8)
    model = Evaluated(aux_loss_coef=10.0, bias_update_rate=0.1)
    loader = data(n=8)
    expected = model.task_loss(next(iter(loader))).item()
    t = trainer()
    (val,) = t.validate(model, loader, verbose=False)
    (test,) = t.test(model, loader, verbose=False)
    t.predict(model, loader)
    assert val == {"val_loss": pytest.approx(expected, rel=1e-5)}
    assert test == {"test_loss": pytest.approx(expected, rel=1e-5)}
    for layer in model.layers:
        assert layer.tokens_per_expert.sum() == 8 * 2  # stats recorded
        assert layer.expert_bias.abs().sum() == 0  # no balancing outside training


class Late(Tiny):
    def configure_model(self):
        if not hasattr(self, "late"):
            self.late = MoE(8, 4, top_k=2, hidden_dim=16, aux_loss_coef=1.0)

    def forward(self, x):
        self.late(x)  # output unused: its router learns only from the aux loss
        return super().forward(x)


def test_layers_added_in_configure_model_are_found():
    torch.manual_seed(9)
    model = Late(num_layers=1)
    capture = GradCapture()
    trainer(callbacks=[capture]).fit(model, data())
    assert [name for name, _ in model.moe_layers()] == ["layers.0", "late"]
    assert model.late.layer_name == "late"
    assert capture.grads[0]["late.router.gate.weight"].abs().sum() > 0


def test_checkpoint_resume_restores_expert_bias_and_matches_uninterrupted(tmp_path):
    kwargs = dict(optimizer="adam", lr=1e-2, bias_update_rate=0.05)
    torch.manual_seed(10)
    straight = Tiny(**kwargs)
    resumed = copy.deepcopy(straight)
    trainer(max_steps=-1, max_epochs=2).fit(straight, data())

    t = trainer(max_steps=-1, max_epochs=1)
    t.fit(resumed, data())
    path = str(tmp_path / "half.ckpt")
    t.save_checkpoint(path)
    loaded = Tiny.load_from_checkpoint(path)
    assert dict(loaded.hparams) == {"dim": 8, "num_experts": 4, "top_k": 2, "num_layers": 2, "lr": 1e-2,
                                    "optimizer": "adam", "aux_loss_coef": 1e-2, "z_loss_coef": 1e-3,
                                    "bias_update_rate": 0.05, "capacity_factor": None, "log_per_layer": None}
    torch.testing.assert_close(loaded.layers[1].expert_bias, resumed.layers[1].expert_bias)
    assert loaded.layers[1].expert_bias.abs().sum() > 0

    torch.manual_seed(11)
    fresh = Tiny(**kwargs)  # other weights: all state must come from the checkpoint
    trainer(max_steps=-1, max_epochs=2).fit(fresh, data(), ckpt_path=path)
    torch.testing.assert_close(fresh.state_dict(), straight.state_dict())


def ddp_batches(rank: int | None = None) -> DataLoader:
    """Six steps of 8 tokens per rank, in order; rank None gives the global batches (both ranks' tokens)."""
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(6, 2, 8, 8, generator=g), torch.randn(6, 2, 8, generator=g)
    x[..., 0] += 2.0
    if rank is None:
        return DataLoader(TensorDataset(x.flatten(0, 2), y.flatten()), batch_size=16)
    return DataLoader(TensorDataset(x[:, rank].flatten(0, 1), y[:, rank].flatten()), batch_size=8)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_adds_aux_and_balances_on_counts_of_all_ranks(tmp_path):
    """2-process gloo DDP: bias after 6 steps equals the single-process run on the global batches."""

    ranks = run_script("module_ddp.py", out=tmp_path, ranks=2).results

    torch.manual_seed(0)
    single = Tiny(lr=0.0, bias_update_rate=0.05, top_k=1)
    trainer(max_steps=6).fit(single, ddp_batches())
    expected = [layer.expert_bias.tolist() for layer in single.layers]
    assert sum(abs(b) for layer in expected for b in layer) > 0
    for result in ranks:
        assert sum(result["bias"], []) == pytest.approx(sum(expected, []))
        assert len(result["rows"]) == 6
        for returned, task_plus_aux in result["rows"]:
            assert returned == pytest.approx(task_plus_aux, rel=1e-5)


def test_totals_combine_per_layer_values():
    torch.manual_seed(13)
    t = trainer(max_steps=2)
    model = Tiny(num_layers=3, num_experts=8, log_per_layer=True, capacity_factor=0.5)
    t.fit(model, data(batch_size=16))
    pickle.loads(pickle.dumps(copy.deepcopy(model)))  # no loss graphs held after the step
    m = {k: v.item() for k, v in t.callback_metrics.items()}
    per_layer = {stat: [m[f"moe/layer_{i}/{stat}"] for i in range(3)] for stat in STATS}
    assert m["moe/aux_loss"] == pytest.approx(sum(per_layer["aux_loss"]), rel=1e-5)
    assert m["moe/z_loss"] == pytest.approx(sum(per_layer["z_loss"]), rel=1e-5)
    assert m["moe/load_imbalance"] == pytest.approx(max(per_layer["load_imbalance"]), rel=1e-6)
    assert len(set(per_layer["load_imbalance"])) > 1
    assert m["moe/routing_entropy"] == pytest.approx(sum(per_layer["routing_entropy"]) / 3, rel=1e-5)
    # every layer routes the same number of assignments, so the total share is the mean share
    assert m["moe/dropped_fraction"] == pytest.approx(sum(per_layer["dropped_fraction"]) / 3, rel=1e-5)
    assert m["moe/dropped_fraction"] > 0
