"""Turn an existing dense LightningModule into a Mixture-of-Experts model with :func:`lightning_moe.upcycle`.

``CharTransformer`` below stands for the project you already have: a plain ``LightningModule`` built on
``torch.nn.TransformerEncoder`` (a causal byte-level language model, in the style of PyTorch's
``word_language_model`` example), written without any knowledge of lightning-moe. The script

1. trains it dense for ``--dense-steps`` (your existing training run),
2. upcycles it: every ``nn.TransformerEncoderLayer``'s feed-forward block becomes an MoE layer whose experts
   are copies of the trained block, so the model computes exactly what it computed before,
3. trains the MoE model further with ``Trainer(strategy="moe")`` (expert parallel when ``--devices > 1``).

The class itself is not edited. For the routing (load-balancing) losses, the MoE phase uses a subclass that
only adds :class:`lightning_moe.MoELightningModule` as a base; it wraps ``CharTransformer.training_step`` and
adds the MoE layers' ``aux_loss`` to the loss it returns. Without the base class, add them yourself:
``loss = task_loss + sum(m.aux_loss for m in self.modules() if isinstance(m, lmoe.MoE))``::

    python examples/upcycle_existing_model.py                 # MoE phase on 2 CPU processes, ~3 minutes
    python examples/upcycle_existing_model.py --devices 1      # one process
"""

from __future__ import annotations

import argparse
import math
import os
import time

import lightning as L
import torch
import torch.nn.functional as F
from _common import VOCAB, ByteDataModule, add_trainer_args, make_trainer
from torch import nn

import lightning_moe as lmoe

# --------------------------------------------------------------------------------------------------
# Your existing code, unchanged: a plain LightningModule on nn.TransformerEncoder.


class CharTransformer(L.LightningModule):
    def __init__(self, vocab: int = 256, d_model: int = 128, nhead: int = 4, num_layers: int = 4,
                 dim_feedforward: int = 256, dropout: float = 0.0, max_len: int = 128, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embedding = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        seq = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=tokens.device)
        x = self.embedding(tokens) + self.position(torch.arange(seq, device=tokens.device))
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True)))

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        tokens, targets = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# --------------------------------------------------------------------------------------------------
# The MoE version: the same class with MoELightningModule as an extra base (adds the routing losses).


class MoECharTransformer(lmoe.MoELightningModule, CharTransformer):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-steps", type=int, default=200, help="steps of the dense run before upcycling")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.01, help="relative noise on the expert copies")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    add_trainer_args(parser, devices=2, max_steps=150)
    args = parser.parse_args(argv)
    if args.smoke:
        args.dense_steps, args.max_steps, args.seq_len, args.batch_size = 2, 3, 32, 4
    return args


def _is_launcher() -> bool:
    # Ranks started by Lightning's launcher carry LOCAL_RANK > 0; the process the user started has none (or 0).
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def held_out_loss(model: L.LightningModule, data: ByteDataModule, batches: int | None = None) -> float:
    """Mean held-out loss in eval mode, in this process (no Trainer: before and right after upcycling)."""
    model.eval()
    losses = []
    with torch.no_grad():
        for i, (tokens, targets) in enumerate(data.val_dataloader()):
            if batches is not None and i >= batches:
                break
            losses.append(F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> dict:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    small = dict(d_model=32, nhead=2, num_layers=1, dim_feedforward=64) if args.smoke else {}
    data = ByteDataModule(args.seq_len, args.batch_size, max_bytes=20_000 if args.smoke else None)
    eval_batches = 2 if args.smoke else 20

    # 1. The existing dense training run (one process: it is the "before" you already have). With --devices > 1
    # Lightning starts the other ranks by re-running this script when the MoE phase begins: they load the
    # dense weights rank 0 saved instead of training them again.
    dense = CharTransformer(vocab=VOCAB, max_len=args.seq_len, **small)
    dense_path = os.path.join(args.log_dir, "upcycle", f"dense-{os.getpid() if _is_launcher() else os.getppid()}.pt")
    if _is_launcher():
        dense_args = argparse.Namespace(**{**vars(args), "devices": 1, "strategy": "auto"})
        make_trainer(dense_args, "upcycle/dense", max_steps=args.dense_steps, limit_val_batches=0).fit(dense, data)
        os.makedirs(os.path.dirname(dense_path), exist_ok=True)
        torch.save(dense.state_dict(), dense_path)
    else:
        dense.load_state_dict(torch.load(dense_path))

    # 2. Upcycle: same hyperparameters and weights, MoE feed-forward blocks.
    model = MoECharTransformer(**dense.hparams)
    model.load_state_dict(dense.state_dict())
    before = held_out_loss(model, data, eval_batches)
    report = lmoe.upcycle(model, num_experts=args.num_experts, top_k=args.top_k)
    at_conversion = held_out_loss(model, data, eval_batches)
    if args.noise:  # break the experts' symmetry after checking the exact conversion
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, lmoe.MoE)):
                for param in layer.experts.parameters():
                    param.mul_(1 + args.noise * torch.randn_like(param))

    # 3. Train the MoE model with the expert-parallel strategy.
    trainer = make_trainer(args, "upcycle/moe", val_check_interval=50 if not args.smoke else 3,
                           check_val_every_n_epoch=None, limit_val_batches=eval_batches)
    if trainer.is_global_zero:
        print(f"data: {data.describe()}")
        print(report)
        print(f"held-out loss (first {eval_batches} batches): dense {before:.4f}, right after upcycling "
              f"{at_conversion:.4f} (difference {abs(at_conversion - before):.2e})")
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.validate(model, data, verbose=False)
    if trainer.is_global_zero and os.path.exists(dense_path):
        os.remove(dense_path)
    result = {"dense": before, "upcycled": at_conversion, "trained": metrics["val_loss"], "seconds": seconds,
              "report": report}
    if trainer.is_global_zero:
        print(f"held-out loss after {args.max_steps} MoE steps ({seconds:.0f} s, {trainer.strategy.__class__.__name__},"
              f" devices={args.devices}): {metrics['val_loss']:.4f} nats/byte, perplexity "
              f"{math.exp(metrics['val_loss']):.2f}")
    return result


if __name__ == "__main__":
    main()
