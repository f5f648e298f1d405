"""Training step of the examples' transformer: dense FFN vs MoE at equal active parameters, upcycled, compiled.

The model is the byte-level language model of ``examples/`` (:class:`lightning_moe.models.Transformer`
through ``examples/_common.py``: dim 128, 4 layers, 4 heads, sequence 128, batch 16, tied byte embedding).
One step is what ``Trainer.fit`` runs per batch without the Trainer: forward, cross-entropy plus the MoE
layers' aux losses, backward, AdamW step (``fused=True``), ``zero_grad``. Variants:

- ``dense``: every block a dense GELU FFN of width 512;
- ``moe``: every block an MoE of 8 experts, top-2, expert width 256: the active FFN parameters of a token
  equal the dense model's (what ``examples/dense_vs_moe.py`` compares);
- ``upcycled``: the dense model converted by :func:`lightning_moe.upcycle` (8 copies of its FFN, top-2: twice
  its active FFN parameters, as sparse upcycling does);
- ``dense compiled`` / ``moe compiled``: the same under ``torch.compile`` (default mode); the first steps,
  which compile, are warm-up.

Timing as in ``benchmarks/moe_layer.py`` (``benchmarks/_harness.py``): each variant in its own worker process,
steps interleaved in time, medians of wall and CPU time and of per-round ratios to ``dense``; tokens per
second from the median wall time.

Usage: ``python benchmarks/train_step.py [--variants dense moe upcycled] [--repeats 15] [--threads 1]
[--precision bf16-mixed]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]  # run from a checkout

from _common import VOCAB, LMConfig, build_language_model  # noqa: E402
from _harness import interleaved, load_average, serve  # noqa: E402

import lightning_moe as lmoe  # noqa: E402

VARIANTS = ("dense", "moe", "upcycled", "dense compiled", "moe compiled")
SEQ_LEN, BATCH = 128, 16


def build(variant: str) -> torch.nn.Module:
    """The model of a variant (uncompiled)."""
    moe = variant.startswith("moe")
    config = LMConfig(seq_len=SEQ_LEN, num_experts=8 if moe else 0, top_k=2)
    model = build_language_model(config)
    if variant == "upcycled":
        lmoe.upcycle(model, num_experts=8, top_k=2, noise=0.01)
    return model


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters a token uses: an MoE layer contributes its router, ``top_k`` experts and shared experts."""
    total = sum(p.numel() for p in model.parameters())
    for layer in (m for m in model.modules() if isinstance(m, lmoe.MoE)):
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
        total -= per_expert * (layer.num_experts - layer.top_k)
    return total


def make_step(variant: str, precision: str):
    """A closure running one training step of ``variant`` on a fixed random batch."""
    torch.manual_seed(0)
    model = build(variant)
    forward = torch.compile(model) if variant.endswith("compiled") else model
    # fused: torch's single-kernel AdamW (CPU too), for every variant: the update is not what is compared
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(VOCAB, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        with autocast:
            logits = forward(inputs)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1)) + model.aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        _, step = make_step(args.worker, args.precision)
        serve(step, warmup=3)  # compiled variants compile in the first two steps (forward, then backward)
        return {}

    variants = list(dict.fromkeys(["dense", *args.variants]))
    threads = args.threads or torch.get_num_threads()
    params = {v: build(v) for v in variants if not v.endswith("compiled")}
    print(f"torch {torch.__version__}, {threads} threads, {args.precision}, batch {BATCH} x {SEQ_LEN} tokens; "
          f"load average {load_average():.1f}; {args.repeats} interleaved rounds, one worker process per variant")
    workers = {v: [os.path.abspath(__file__), "--worker", v, "--threads", str(threads), "--precision", args.precision]
               for v in variants}
    times = interleaved(workers, args.repeats, reference="dense")
    header = (f"| {'variant':>14} | {'params':>9} | {'active':>9} | {'wall ms':>8} | {'x dense':>7} | {'CPU ms':>8} "
              f"| {'x dense':>7} | {'tokens/s':>8} |")
    print(header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for v in variants:
        model = params[v.removesuffix(" compiled")]
        t = times[v]
        print(f"| {v:>14} | {sum(p.numel() for p in model.parameters()):>9,} | {active_parameters(model):>9,} "
              f"| {1e3 * t['wall']:>8.1f} | {t['wall_x']:>7.2f} | {1e3 * t['cpu']:>8.1f} | {t['cpu_x']:>7.2f} "
              f"| {BATCH * SEQ_LEN / t['wall']:>8.0f} |")
    print(f"load average at the end {load_average():.1f}")
    if args.json:
        print(json.dumps(times))
    return times


if __name__ == "__main__":
    main()
