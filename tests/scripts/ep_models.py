"""Tiny MoE models, data and a single-process reference loop shared by the expert-parallel tests.

The reference (:func:`reference_train`) is plain PyTorch on the global batch: what N-rank training
with MoEStrategy must reproduce. Aux and z losses are off unless ``aux_losses=True`` (the default
coefficients and loss scope of :class:`~lightning_moe.MoE`, added to the task loss).
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_moe as lmoe

DIM, EXPERTS, GLOBAL_BATCH, STEPS = 8, 4, 8, 5


def make_data(steps: int = STEPS, batch: int = GLOBAL_BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch, 3, DIM, generator=g)  # 3 tokens per sample
    y = torch.randn(steps * batch, 1, generator=g)
    return x, y


class Net(nn.Module):
    """Linear -> MoE (stacked experts) -> MoE (template experts) -> head."""

    def __init__(self, num_experts: int = EXPERTS, bias_update_rate: float = 0.0, aux_losses: bool = False) -> None:
        super().__init__()
        moe = dict(top_k=2, hidden_dim=16, bias_update_rate=bias_update_rate)
        if not aux_losses:
            moe.update(aux_loss_coef=0.0, z_loss_coef=0.0)
        self.inp = nn.Linear(DIM, DIM)
        self.moe1 = lmoe.MoE(DIM, num_experts, **moe)
        self.moe2 = lmoe.MoE(DIM, num_experts, expert=nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, DIM)),
                             **moe)
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.moe1(h)
        h = h + self.moe2(h)
        return self.head(h).mean(dim=1)

    def aux_loss(self) -> torch.Tensor:
        return self.moe1.aux_loss + self.moe2.aux_loss


class Model(L.LightningModule):
    """Plain LightningModule with MoE layers; each rank reads its contiguous slice of every global batch."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.9, num_experts: int = EXPERTS, adam: bool = False,
                 steps: int = STEPS, accumulate: int = 1, bias_update_rate: float = 0.0,
                 aux_losses: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = Net(num_experts, bias_update_rate, aux_losses)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        return loss + self.net.aux_loss() if self.hparams.aux_losses else loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.mse_loss(self(batch[0]), batch[1]), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        if self.hparams.adam:
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def train_dataloader(self):
        # One optimizer step an epoch (Trainer(reload_dataloaders_every_n_epochs=1)): epoch e reads global
        # micro-batches [e * accumulate, (e + 1) * accumulate), so a resumed run continues where it stopped.
        acc = self.hparams.accumulate
        x, y = make_data(self.hparams.steps * acc)
        world, rank, epoch = self.trainer.world_size, self.trainer.global_rank, self.current_epoch
        per = GLOBAL_BATCH // world
        idx = torch.cat([torch.arange(m * GLOBAL_BATCH + rank * per, m * GLOBAL_BATCH + (rank + 1) * per)
                         for m in range(epoch * acc, (epoch + 1) * acc)])
        return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=per, shuffle=False)


class BalancedModel(lmoe.MoELightningModule, Model):
    """The same model on the package's base class, with aux-loss-free balancing (expert_bias updates)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(bias_update_rate=0.05, **kwargs)


def reference_train(steps: int = STEPS, accumulate: int = 1, clip: float | None = None, adam: bool = False,
                    micro_batch: int = GLOBAL_BATCH, aux_losses: bool = False) -> Model:
    """Single-process training on the global batches (micro-batches of ``micro_batch`` rows).

    Returns the model; its optimizer is ``model.reference_optimizer``.
    """
    model = Model(adam=adam, lr=0.01 if adam else 0.1, steps=steps, accumulate=accumulate, aux_losses=aux_losses)
    opt = model.configure_optimizers()
    x, y = make_data(steps * accumulate)
    for step in range(steps):
        opt.zero_grad()
        for m in range(accumulate):
            rows = slice((step * accumulate + m) * micro_batch, (step * accumulate + m + 1) * micro_batch)
            loss = nn.functional.mse_loss(model(x[rows]), y[rows])
            loss = (loss + model.net.aux_loss() if aux_losses else loss) / accumulate
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    model.reference_optimizer = opt
    return model


def eval_loader(rank: int, world: int, batches: int = 2) -> DataLoader:
    """This rank's contiguous slice of each of ``batches`` global evaluation batches."""
    x, y = make_data(batches, seed=3)
    per = GLOBAL_BATCH // world
    idx = torch.cat([torch.arange(b * GLOBAL_BATCH + rank * per, b * GLOBAL_BATCH + (rank + 1) * per)
                     for b in range(batches)])
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=per, shuffle=False)


def probe_input() -> torch.Tensor:
    return torch.randn(4, 3, DIM, generator=torch.Generator().manual_seed(7))
