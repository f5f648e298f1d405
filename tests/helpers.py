"""What many tests share: one small MoE model, one data module and one trainer factory.

* :class:`TinyMoE`: a residual stack of :class:`~lightning_moe.MoE` layers and a linear head under
  :class:`~lightning_moe.MoELightningModule`; every hyperparameter is an ``__init__`` argument (LightningCLI,
  ``load_from_checkpoint``); ``training_step`` returns only the task loss (the base class adds the routing losses).
* :class:`RegressionData`: seeded random tokens ``[n, dim]`` with a scalar target; ``offset`` shifts the first
  feature so that routing is skewed (capacity binds, balancing has work to do).
* :func:`make_trainer`: a quiet one-device CPU ``Trainer`` that runs one step unless told otherwise.

Tests import it by name (``from helpers import TinyMoE``): ``tests/`` is on ``sys.path`` through conftest.py, and
scripts started by ``tests/launch.py`` get it on ``PYTHONPATH``.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE, MoELightningModule


class TinyMoE(MoELightningModule):
    """Residual stack of ``num_layers`` MoE layers of width ``dim`` and a linear head: ``[B, dim] -> [B]``.

    Args:
        dim: Model width.
        num_experts: Experts per layer.
        top_k: Experts per token.
        num_layers: MoE layers.
        lr: Learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        aux_loss_coef, z_loss_coef, bias_update_rate, capacity_factor: Of every :class:`~lightning_moe.MoE`.
        log_per_layer: Passed to :class:`~lightning_moe.MoELightningModule`.
    """

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

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x).squeeze(-1)

    def task_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.task_loss(batch)

    def configure_optimizers(self):
        cls = torch.optim.Adam if self.hparams.optimizer == "adam" else torch.optim.SGD
        return cls(self.parameters(), lr=self.hparams.lr)


class RegressionData(L.LightningDataModule):
    """``n`` random samples ``x [dim]`` with targets ``y []``, in order, ``batch_size`` at a time, every stage.

    Args:
        n: Samples.
        dim: Width of ``x``.
        batch_size: Samples per batch.
        seed: Generator seed (the same data for the same arguments).
        offset: Added to the first feature of every sample (skews routing).
    """

    def __init__(self, n: int = 32, dim: int = 8, batch_size: int = 8, seed: int = 0, offset: float = 0.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.x[:, 0] += offset
        self.y = torch.randn(n, generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    val_dataloader = test_dataloader = predict_dataloader = train_dataloader


def make_trainer(**kwargs) -> L.Trainer:
    """A CPU ``Trainer`` on one device, one step, without logger, checkpoints, progress bar or summary;
    ``kwargs`` override any of these."""
    args = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kwargs)
    return L.Trainer(**args)
