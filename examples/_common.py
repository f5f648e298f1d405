"""Shared example code: the byte-level corpus, a small GPT-style language model with MoE or dense MLPs (the
package's :class:`lightning_moe.models.Transformer`), and Trainer set-up from command-line flags.

The corpus is the Python documentation text that ships with CPython (``pydoc_data.topics``, ~466 kB), so the
examples run offline. Bytes are the vocabulary (256 symbols); the last ``held_out`` share of the text is the
held-out split.

Shape legend: B batch, S sequence length, D model width, V vocabulary (256).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import lightning_moe as lmoe  # noqa: E402  (registers the "moe" strategy)
from lightning_moe.architecture import Architecture  # noqa: E402
from lightning_moe.models import Transformer  # noqa: E402

VOCAB = 256

# --------------------------------------------------------------------------------------------------
# Data


def pydoc_corpus() -> bytes:
    """The CPython documentation topics (``pydoc_data.topics``) joined in key order, UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


class ByteWindows(Dataset):
    """Windows of ``seq_len + 1`` bytes at a fixed stride: ``(input [S], target [S])`` for next-byte prediction."""

    def __init__(self, data: Tensor, seq_len: int, stride: int) -> None:
        self.data = data
        self.seq_len = seq_len
        self.starts = range(0, len(data) - seq_len - 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        chunk = self.data[self.starts[index]: self.starts[index] + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


class ByteDataModule(L.LightningDataModule):
    """Next-byte prediction on the pydoc corpus; training windows overlap by half, held-out windows do not.

    Args:
        seq_len: tokens per sample.
        batch_size: samples per batch and device.
        held_out: share of the corpus (its end) kept for evaluation.
        max_bytes: cut the corpus to this many bytes (smoke tests).
    """

    def __init__(self, seq_len: int = 128, batch_size: int = 16, held_out: float = 0.1,
                 max_bytes: int | None = None) -> None:
        super().__init__()
        data = torch.frombuffer(bytearray(pydoc_corpus()[:max_bytes]), dtype=torch.uint8)
        split = int(len(data) * (1 - held_out))
        self.train_data, self.val_data = data[:split], data[split:]
        self.seq_len = seq_len
        self.batch_size = batch_size

    def describe(self) -> str:
        return (f"pydoc_data.topics (CPython documentation): {len(self.train_data):,} training bytes, "
                f"{len(self.val_data):,} held-out bytes, byte-level vocabulary of {VOCAB}")

    def train_dataloader(self) -> DataLoader:
        data = ByteWindows(self.train_data, self.seq_len, max(1, self.seq_len // 2))
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ByteWindows(self.val_data, self.seq_len, self.seq_len), batch_size=self.batch_size)


# --------------------------------------------------------------------------------------------------
# Model


@dataclass
class LMConfig:
    """A small GPT. ``num_experts=0`` gives dense MLPs of width ``ffn_hidden``; otherwise every ``moe_every``-th
    block gets an MoE with ``num_experts`` experts of width ``ffn_hidden // top_k``, so a token uses as many
    feed-forward parameters as in the dense model (equal active parameters per token)."""

    seq_len: int = 128
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn_hidden: int = 512
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1
    aux_loss_coef: float = 1e-2

    @property
    def expert_hidden(self) -> int:
        return self.ffn_hidden // self.top_k

    def architecture(self) -> Architecture:
        """The planner's description of this model: GELU MLPs, a lm head tied to the byte embedding."""
        dense = self.num_experts == 0  # every layer dense: dense_layers covers them all, the experts are unused
        return Architecture(self.layers, self.dim, self.heads, VOCAB, self.expert_hidden,
                            experts=max(self.num_experts, self.top_k), top_k=self.top_k, tie_embeddings=True,
                            ffn_hidden=self.ffn_hidden, activation="gelu", moe_every=self.moe_every,
                            dense_layers=self.layers if dense else 0, name="byte-lm")


def build_language_model(config: LMConfig) -> Transformer:
    """The package's decoder-only transformer (:class:`lightning_moe.models.Transformer`) with learned positions."""
    return Transformer(config.architecture(), max_seq_len=config.seq_len,
                       moe_kwargs={"aux_loss_coef": config.aux_loss_coef})


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, active per token)``: an MoE layer contributes its router, ``top_k`` experts and shared experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, lmoe.MoE):
            per_expert = sum(p.numel() for p in m.experts.parameters()) // m.experts.num_experts
            inactive += per_expert * (m.num_experts - m.top_k)
    return total, total - inactive


class LanguageModel(lmoe.MoELightningModule):
    """Next-byte prediction. The base class adds the MoE layers' balancing losses to the returned loss.

    Args:
        config: the model (as :class:`LMConfig` or its dict).
        lr: peak AdamW learning rate; linear warm-up, cosine decay to 10% over ``schedule_steps``.
        warmup: warm-up steps.
        schedule_steps: length of the schedule; default the Trainer's ``max_steps``.
        schedule_offset: start the schedule at this step (a run that continues another one).
    """

    def __init__(self, config: LMConfig | dict, lr: float = 3e-3, warmup: int = 30,
                 schedule_steps: int | None = None, schedule_offset: int = 0) -> None:
        super().__init__()
        config = LMConfig(**config) if isinstance(config, dict) else config
        self.save_hyperparameters({"config": asdict(config), "lr": lr, "warmup": warmup,
                                   "schedule_steps": schedule_steps, "schedule_offset": schedule_offset})
        self.model = build_language_model(config)

    def forward(self, idx_BS: Tensor) -> Tensor:
        return self.model(idx_BS)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        idx_BS, target_BS = batch
        logits = self(idx_BS)
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), target_BS.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=(0.9, 0.95), weight_decay=0.01)
        total = hp.schedule_steps or max(1, self.trainer.max_steps)

        def factor(step: int) -> float:
            step += hp.schedule_offset
            if step < hp.warmup:
                return (step + 1) / hp.warmup
            progress = min(1.0, (step - hp.warmup) / max(1, total - hp.warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --------------------------------------------------------------------------------------------------
# Trainer from flags


def add_trainer_args(parser: argparse.ArgumentParser, devices: int = 1, max_steps: int = 300,
                     precision: str = "32-true") -> None:
    group = parser.add_argument_group("trainer")
    group.add_argument("--devices", type=int, default=devices, help="processes (CPU) or GPUs")
    group.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    group.add_argument("--strategy", default=None,
                       help='default: "moe" (expert parallel) when devices > 1, else "auto"')
    group.add_argument("--precision", default=precision, help='e.g. "32-true", "bf16-mixed"')
    group.add_argument("--max-steps", type=int, default=max_steps)
    group.add_argument("--logger", choices=("tensorboard", "csv"), default="tensorboard")
    group.add_argument("--log-dir", default="lightning_logs")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (tests)")


def default_strategy(args: argparse.Namespace) -> str:
    return args.strategy or ("moe" if args.devices > 1 else "auto")


def shrink_language_model_for_smoke(args: argparse.Namespace) -> None:
    """Tiny language-model sizes for ``--smoke`` runs (the tests run every example this way)."""
    args.dim, args.layers, args.heads, args.ffn_hidden, args.seq_len, args.batch_size = 32, 1, 2, 64, 32, 4


def make_logger(args: argparse.Namespace, name: str):
    if args.logger == "tensorboard":
        try:
            return TensorBoardLogger(args.log_dir, name=name)
        except ModuleNotFoundError:  # tensorboard not installed
            pass
    return CSVLogger(args.log_dir, name=name)


def make_trainer(args: argparse.Namespace, name: str, **kwargs) -> L.Trainer:
    options = dict(
        accelerator=args.accelerator, devices=args.devices, strategy=default_strategy(args),
        precision=args.precision, max_steps=args.max_steps, logger=make_logger(args, name),
        enable_checkpointing=False, log_every_n_steps=10, num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)
