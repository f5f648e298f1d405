"""Train a small MoE language model, then compress its experts every way lightning-moe offers; print a table.

The model and data are those of ``examples/language_model.py`` (byte-level GPT on the CPython documentation,
``pydoc_data.topics``, last 10% held out), trained on one CPU process. Then, each on a copy of the trained
model, measured on the same held-out bytes:

- ``bf16 weights, fp32 routers``: ``precision="bf16-true"`` with ``RouterPrecision``'s layout.
- ``int8 experts``: :func:`lightning_moe.compress.quantize_experts` (weight-only, per output channel).
- ``low rank``: :func:`lightning_moe.compress.low_rank_experts` by kept energy.
- ``expert pruning``: drop the least-used experts of every layer (counts over training batches), without and
  with a short fine-tune through the :class:`~lightning_moe.callbacks.ExpertPruning` callback.
- ``magnitude pruning``: :class:`~lightning_moe.callbacks.ExpertMagnitudePruning`, L1 unstructured and
  per-expert hidden neurons, then a short fine-tune with the masks in place.

Runs offline on CPU; the defaults took 16 minutes on 2 shared, busy cores (400 training steps at ~1 s each,
4 fine-tunes of 60 steps)::

    python examples/compress_experts.py                  # table on stdout (markdown)
    python examples/compress_experts.py --max-steps 150 --finetune-steps 20 --eval-batches 10   # a quicker look
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from _common import (
    VOCAB,
    ByteDataModule,
    LanguageModel,
    LMConfig,
    add_trainer_args,
    make_trainer,
    shrink_language_model_for_smoke,
)

import lightning_moe as lmoe
from lightning_moe.callbacks import ExpertMagnitudePruning, ExpertPruning
from lightning_moe.callbacks.pruning import choose_experts, remove_experts
from lightning_moe.compress import low_rank_experts, module_bytes, quantize_experts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=int, default=96)
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--num-experts", type=int, default=8)
    model.add_argument("--top-k", type=int, default=2)
    model.add_argument("--ffn-hidden", type=int, default=384, help="each expert gets ffn_hidden / top_k")
    model.add_argument("--seq-len", type=int, default=64)
    model.add_argument("--batch-size", type=int, default=16)
    model.add_argument("--lr", type=float, default=3e-3)
    model.add_argument("--finetune-steps", type=int, default=60, help="steps after pruning (callback rows)")
    model.add_argument("--eval-batches", type=int, default=40, help="held-out batches per measurement")
    add_trainer_args(parser, devices=1, max_steps=400)
    args = parser.parse_args(argv)
    if args.smoke:
        shrink_language_model_for_smoke(args)
        args.max_steps, args.finetune_steps, args.eval_batches = min(args.max_steps, 4), 2, 2
    return args


def moe_banks(model: torch.nn.Module):
    return [m.experts for m in model.modules() if isinstance(m, lmoe.MoE)]


def expert_stats(model: torch.nn.Module) -> tuple[int, int]:
    """``(nonzero expert weights, expert bytes)`` over every layer's expert bank (pruning masks applied)."""
    nonzero = 0
    for bank in moe_banks(model):
        tensors = {name: t for name, t in list(bank.named_parameters()) + list(bank.named_buffers())
                   if not name.endswith("_mask") and t.dtype != torch.long}
        for name, t in tensors.items():
            mask = getattr(bank, name[: -len("_orig")] + "_mask", None) if name.endswith("_orig") else None
            nonzero += int(((t * mask) if mask is not None else t).count_nonzero())
    return nonzero, sum(module_bytes(bank) for bank in moe_banks(model))


@torch.no_grad()
def held_out_loss(model: LanguageModel, data: ByteDataModule, batches: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i, (idx, target) in enumerate(data.val_dataloader()):
        if i == batches:
            break
        logits = model(idx)
        total += F.cross_entropy(logits.reshape(-1, VOCAB).float(), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    model.train()
    return total / count


@torch.no_grad()
def usage_counts(model: LanguageModel, data: ByteDataModule, batches: int) -> dict[str, torch.Tensor]:
    """Tokens routed to each expert of each layer over ``batches`` training batches."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lmoe.MoE)]
    counts = {n: torch.zeros(m.num_experts, dtype=torch.long) for n, m in layers}
    for i, (idx, _) in enumerate(data.train_dataloader()):
        if i == batches:
            break
        model(idx)
        for n, m in layers:
            counts[n] += m.tokens_per_expert
    return counts


def finetune(model: LanguageModel, data: ByteDataModule, args, callback, name: str) -> LanguageModel:
    """Continue training for ``finetune_steps`` (one counting epoch, then the rest) with ``callback``."""
    model = copy.deepcopy(model)
    half = max(1, args.finetune_steps // 2)
    trainer = make_trainer(args, name, max_steps=2 * half, max_epochs=2, limit_train_batches=half,
                           limit_val_batches=0, callbacks=[callback], enable_progress_bar=False,
                           enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return model


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    config = LMConfig(seq_len=args.seq_len, dim=args.dim, layers=args.layers, heads=args.heads,
                      ffn_hidden=args.ffn_hidden, num_experts=args.num_experts, top_k=args.top_k)
    data = ByteDataModule(args.seq_len, args.batch_size, max_bytes=20_000 if args.smoke else None)
    model = LanguageModel(config, lr=args.lr, schedule_steps=args.max_steps)
    print(f"data: {data.describe()}")
    start = time.perf_counter()
    make_trainer(args, "compress_experts", limit_val_batches=0, enable_progress_bar=False,
                 enable_model_summary=False).fit(model, datamodule=data)
    print(f"trained {args.max_steps} steps in {time.perf_counter() - start:.0f} s; measuring on "
          f"{args.eval_batches} held-out batches of {args.batch_size}x{args.seq_len} bytes")
    # Fine-tunes continue with a flat lr at the trained model's last value (schedule offset past its end).
    model.hparams.schedule_offset = args.max_steps
    model_bytes = module_bytes(model)

    rows = []

    def measure(name: str, variant: LanguageModel, note: str = "") -> None:
        nonzero, expert_bytes = expert_stats(variant)
        rows.append({"method": name, "expert_params": nonzero, "expert_bytes": expert_bytes,
                     "model_bytes": module_bytes(variant), "loss": held_out_loss(variant, data, args.eval_batches),
                     "note": note})

    measure("fp32 (trained)", model)

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for layer in bf16.modules():
        if isinstance(layer, lmoe.MoE):
            layer.router.to(torch.float32)
    measure("bf16 weights, fp32 routers", bf16)

    quantized = copy.deepcopy(model)
    report = quantize_experts(quantized)
    measure("int8 experts (quantize_experts)", quantized, f"experts {report.ratio:.2f}x smaller")

    for energy in (0.9, 0.99):
        low = copy.deepcopy(model)
        report = low_rank_experts(low, energy=energy)
        ranks = sorted({str(r) for layer in report.layers for r in layer.detail.values()})
        measure(f"low rank, energy={energy}", low, f"ranks {'/'.join(ranks)} of {config.expert_hidden}")

    # Fine-tuned rows train more steps: compare them with the uncompressed model fine-tuned as long.
    measure("fp32 + fine-tune (reference)", finetune(model, data, args, L.Callback(), "compress_reference"),
            f"no compression, {args.finetune_steps} steps")

    keep = args.num_experts // 2
    counts = usage_counts(model, data, batches=20)
    pruned = copy.deepcopy(model)
    for name, layer in pruned.named_modules():
        if isinstance(layer, lmoe.MoE):
            remove_experts(layer, choose_experts(counts[name], keep, None, layer.top_k)[0])
    measure(f"expert pruning, keep {keep}/{args.num_experts}", pruned, "least-used removed, no fine-tune")
    tuned = finetune(model, data, args, ExpertPruning(keep=keep, at_epoch=0), "compress_prune")
    measure(f"expert pruning, keep {keep}/{args.num_experts} + fine-tune", tuned,
            f"ExpertPruning callback, {args.finetune_steps} steps")

    for structured, label in ((False, "L1 unstructured 50%"), (True, "hidden neurons 50%/expert")):
        pruner = ExpertMagnitudePruning(amount=0.5, structured=structured, apply_pruning=lambda epoch: epoch == 0)
        tuned = finetune(model, data, args, pruner, "compress_magnitude")
        measure(f"magnitude pruning, {label} + fine-tune", tuned,
                f"ExpertMagnitudePruning, {args.finetune_steps} steps; zeros stored densely")

    base = rows[0]["loss"]
    print(f"\nmodel: {model_bytes:,} bytes fp32, experts {rows[0]['expert_bytes']:,} of them; "
          f"{args.num_experts} experts top-{args.top_k} in {args.layers} layers, dim {args.dim}")
    print("held-out loss in nats/byte; Δ against the trained fp32 model")
    print("| method | expert params (nonzero) | expert bytes | model bytes | held-out loss | Δ loss | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['method']} | {row['expert_params']:,} | {row['expert_bytes']:,} | {row['model_bytes']:,} | "
              f"{row['loss']:.4f} | {row['loss'] - base:+.4f} | {row['note']} |")
    assert all(math.isfinite(row["loss"]) for row in rows)
    return rows


if __name__ == "__main__":
    main()
