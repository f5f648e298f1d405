"""Dense vs Mixture-of-Experts at equal active parameters per token and equal steps, plus sparse upcycling.

Three runs of the same GPT on the same bytes (the CPython documentation, ``pydoc_data.topics``) in the same
order:

* **dense**: every block has an MLP of width ``ffn_hidden``.
* **moe**: every block has ``num_experts`` experts of width ``ffn_hidden / top_k``, top-k routing: a token
  touches as many feed-forward parameters as in the dense model (the router adds ``dim * num_experts``).
* **upcycled**: the dense run's weights at half the steps, converted with :func:`lightning_moe.upcycle`
  (each expert a copy of the dense MLP, width ``ffn_hidden``, top-k), trained for the remaining steps on the
  same learning-rate schedule. It uses ``top_k`` times the dense model's feed-forward parameters per token.

Prints a table and writes ``dense_vs_moe.png`` (held-out loss curves), ``dense_vs_moe.md`` and
``dense_vs_moe.json`` under ``--out`` (default ``outputs/``)::

    python examples/dense_vs_moe.py                      # ~3-4 minutes on 2 CPU cores
    python examples/dense_vs_moe.py --max-steps 1000 --num-experts 16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import lightning as L
import torch
from _common import (
    ByteDataModule,
    LanguageModel,
    LMConfig,
    add_trainer_args,
    count_params,
    make_trainer,
    shrink_language_model_for_smoke,
)

import lightning_moe as lmoe


class HeldOutCurve(L.Callback):
    """Records ``(step, held-out loss)`` after every validation; ``offset`` shifts the steps of a continued run."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.points: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step + self.offset
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics or (
                self.points and self.points[-1][0] == step):  # the final validate repeats the last point
            return
        self.points.append((step, float(trainer.callback_metrics["val_loss"])))


class Snapshot(L.Callback):
    """Keeps a copy of the model weights after ``step`` optimizer steps (the upcycling starting point)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state: dict | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.state is None:
            self.state = copy.deepcopy(pl_module.state_dict())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ffn-hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-every", type=int, default=50, help="held-out evaluation every N steps")
    parser.add_argument("--val-batches", type=int, default=0,
                        help="held-out batches per evaluation during training (0: the whole held-out split)")
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--variants", default="dense,moe,upcycled")
    add_trainer_args(parser, devices=1, max_steps=300)
    args = parser.parse_args(argv)
    if args.smoke:
        shrink_language_model_for_smoke(args)
        args.max_steps, args.val_every, args.val_batches = min(args.max_steps, 4), 2, 2
    return args


def run(args, name: str, model: LanguageModel, data: ByteDataModule, steps: int, offset: int = 0,
        callbacks=()) -> dict:
    L.seed_everything(args.seed + offset, workers=True, verbose=False)
    curve = HeldOutCurve(offset)
    trainer = make_trainer(args, f"dense_vs_moe/{name}", max_steps=steps, val_check_interval=args.val_every,
                           check_val_every_n_epoch=None, limit_val_batches=args.val_batches or 1.0,
                           callbacks=[curve, *callbacks])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    total, active = count_params(model)
    return {"name": name, "total_params": total, "active_params": active, "steps": offset + trainer.global_step,
            "held_out_loss": metrics["val_loss"], "seconds": seconds, "curve": curve.points,
            "is_global_zero": trainer.is_global_zero}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    variants = args.variants.split(",")
    base = dict(seq_len=args.seq_len, dim=args.dim, layers=args.layers, heads=args.heads, ffn_hidden=args.ffn_hidden,
                top_k=args.top_k)
    data = ByteDataModule(args.seq_len, args.batch_size, max_bytes=20_000 if args.smoke else None)
    half = args.max_steps // 2
    results = []

    if "dense" in variants or "upcycled" in variants:
        torch.manual_seed(args.seed)
        dense = LanguageModel(LMConfig(num_experts=0, **base), lr=args.lr)
        snapshot = Snapshot(half)
        results.append(run(args, "dense", dense, data, args.max_steps, callbacks=[snapshot]))
    if "moe" in variants:
        torch.manual_seed(args.seed)
        moe = LanguageModel(LMConfig(num_experts=args.num_experts, **base), lr=args.lr)
        results.append(run(args, "moe", moe, data, args.max_steps))
    if "upcycled" in variants:
        # Continue the dense run from half-way on the same schedule, its MLPs turned into experts.
        torch.manual_seed(args.seed)
        upcycled = LanguageModel(LMConfig(num_experts=0, **base), lr=args.lr, schedule_steps=args.max_steps,
                                 schedule_offset=half)
        upcycled.load_state_dict(snapshot.state)
        report = lmoe.upcycle(upcycled.model, num_experts=args.num_experts, top_k=args.top_k, noise=0.01,
                              aux_loss_coef=LMConfig.aux_loss_coef)
        if results[0]["is_global_zero"]:
            print(report)
        result = run(args, "upcycled", upcycled, data, args.max_steps - half, offset=half)
        result["curve"] = [p for p in results[0]["curve"] if p[0] <= half] + result["curve"]
        results.append(result)
        if "dense" not in variants:
            results.pop(0)

    if results and results[0]["is_global_zero"]:
        report_results(args, results)
    return results


def report_results(args, results: list[dict]) -> None:
    rows = ["| variant | total params | active params / token | steps | held-out loss (nats/byte) | bits/byte "
            "| perplexity | train time |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        loss = r["held_out_loss"]
        rows.append(f"| {r['name']} | {r['total_params']:,} | {r['active_params']:,} | {r['steps']} | {loss:.4f} "
                    f"| {loss / math.log(2):.3f} | {math.exp(loss):.2f} | {r['seconds']:.0f} s |")
    setup = (f"{args.layers} layers, dim {args.dim}, dense MLP width {args.ffn_hidden}, MoE {args.num_experts} "
             f"experts x width {args.ffn_hidden // args.top_k} top-{args.top_k}; batch {args.batch_size} x "
             f"{args.seq_len} bytes, {args.max_steps} steps, lr {args.lr}, seed {args.seed}, "
             f"precision {args.precision}, devices {args.devices}")
    if any(r["name"] == "upcycled" for r in results):
        rows.append(f"\nupcycled: steps 1-{args.max_steps // 2} are the dense run's; its train time counts the "
                    f"{args.max_steps - args.max_steps // 2} steps after upcycling. Train times depend on the "
                    "machine's load.")
    table = "\n".join(rows)
    print(f"\n{setup}\n{table}\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dense_vs_moe.md"), "w") as f:
        f.write(f"{setup}\n\n{table}\n")
    with open(os.path.join(args.out, "dense_vs_moe.json"), "w") as f:
        json.dump({"setup": setup, "results": [{k: v for k, v in r.items() if k != "is_global_zero"}
                                               for r in results]}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        steps, losses = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(steps, losses, label=f"{r['name']} ({r['active_params'] / 1e6:.2f}M active, "
                                     f"{r['total_params'] / 1e6:.2f}M total)")
    ax.axvline(args.max_steps // 2, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("Byte-level LM on CPython docs: dense vs MoE vs upcycled")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(args.out, "dense_vs_moe.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}, dense_vs_moe.md and dense_vs_moe.json under {args.out}/")


if __name__ == "__main__":
    main()
