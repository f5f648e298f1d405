"""Models and single-process references for the ``data_parallel="fsdp"`` tests (tests/test_fsdp.py).

:class:`AdamWModel` is ``ep_models.Model`` (Linear -> MoE with stacked experts -> MoE with template experts -> head,
aux losses off) trained with AdamW of a large ``eps`` (1e-3: Adam's normalisation would amplify rounding in
near-zero gradients). :class:`MetaTransformer` builds the package transformer in ``configure_model``, which the
FSDP strategy runs on the meta device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lightning_moe as lmoe
from lightning_moe.models import Transformer
from lightning_moe.plan import Architecture

from ep_models import GLOBAL_BATCH, STEPS, Model, make_data

# Small, with the trillion preset's structure: GQA, a leading dense layer, a shared expert, swiglu.
ARCH = Architecture(3, 32, 4, 64, 16, 8, 2, kv_heads=2, head_dim=8, ffn_hidden=48, shared_experts=1, dense_layers=1)


class AdamWModel(Model):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, eps=1e-3, weight_decay=0.01)


def reference_train(steps: int = STEPS, accumulate: int = 1, clip: float | None = None, lr: float = 0.01,
                    resume_at: int | None = None, aux_losses: bool = False) -> AdamWModel:
    """Single-process AdamW on the global batches (what every FSDP run must reproduce)."""
    model = AdamWModel(lr=lr, steps=steps, accumulate=accumulate, aux_losses=aux_losses)
    opt = model.configure_optimizers()
    x, y = make_data(steps * accumulate)
    for step in range(steps):
        opt.zero_grad()
        for m in range(accumulate):
            rows = slice((step * accumulate + m) * GLOBAL_BATCH, (step * accumulate + m + 1) * GLOBAL_BATCH)
            loss = nn.functional.mse_loss(model(x[rows]), y[rows])
            loss = (loss + model.net.aux_loss() if aux_losses else loss) / accumulate
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    model.reference_optimizer = opt
    return model


class MetaTransformer(lmoe.MoELightningModule):
    """The package transformer of ``ARCH`` built in ``configure_model`` (on meta under data_parallel="fsdp")."""

    def __init__(self, arch: Architecture = ARCH, lr: float = 1e-3, moe_kwargs: dict | None = None,
                 meta: bool = False) -> None:
        super().__init__()
        self.arch, self.lr, self.moe_kwargs, self.meta = arch, lr, moe_kwargs or {}, meta
        self.model: Transformer | None = None

    def configure_model(self) -> None:
        if self.model is None:  # meta=True: on meta under any strategy (FSDP's configure_model runs on meta anyway)
            self.model = Transformer(self.arch, moe_kwargs=self.moe_kwargs, device="meta" if self.meta else None)

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, eps=1e-3)
