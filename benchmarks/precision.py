"""One MoE layer in float32, bf16-mixed (autocast) and bf16-true (bf16 experts, float32 router), as ratios in one run.

Work: top-2, 4096 tokens, dim 256, hidden 1024, GELU, dropless, 8 experts (as benchmarks/moe_layer.py).

- ``fp32``: float32 weights and input, no autocast.
- ``bf16-mixed``: float32 weights, ``torch.autocast("cpu", torch.bfloat16)`` (Lightning's
  ``precision="bf16-mixed"``; on CPU ``"16-mixed"`` becomes this too). The router opts out of
  autocast and computes in float32.
- ``bf16-true``: bfloat16 expert weights and input, float32 router weights (what
  ``precision="bf16-true"`` with :class:`~lightning_moe.callbacks.RouterPrecision` trains).

Each repeat times ``forward`` (inference) and ``forward + backward`` (a training step without the
optimizer) of every variant, interleaved; the table shows medians and the ratio to float32.

Usage: ``python benchmarks/precision.py [--repeats 7] [--tokens 4096] [--experts 8]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch

from lightning_moe import MoE
from lightning_moe.compress import module_bytes

DIM, HIDDEN, TOP_K = 256, 1024, 2
VARIANTS = ("fp32", "bf16-mixed", "bf16-true")


def build(variant: str, base: MoE, x: torch.Tensor):
    """``(layer, input, autocast context factory)`` for one variant, all from the same float32 layer."""
    layer = copy.deepcopy(base)
    if variant == "bf16-true":
        layer.to(torch.bfloat16)
        layer.router.to(torch.float32)  # what RouterPrecision does under precision="bf16-true"
        return layer, x.to(torch.bfloat16), nullcontext
    if variant == "bf16-mixed":
        return layer, x, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return layer, x, nullcontext


def step(layer: MoE, x: torch.Tensor, context, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        with context():
            y = layer(x)
        (y.float().pow(2).mean() + layer.aux_loss).backward()
        layer.zero_grad(set_to_none=True)
    else:
        with torch.no_grad(), context():
            layer(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = MoE(DIM, args.experts, TOP_K, hidden_dim=HIDDEN)
    x = torch.randn(args.tokens, DIM)
    runs = {v: build(v, base, x) for v in VARIANTS}
    times = {(v, b): [] for v in VARIANTS for b in (False, True)}
    for layer, inp, ctx in runs.values():  # warm-up
        step(layer, inp, ctx, backward=True)
    for _ in range(args.repeats):
        for backward in (False, True):
            for v, (layer, inp, ctx) in runs.items():
                times[(v, backward)].append(step(layer, inp, ctx, backward))

    print(f"MoE layer: {args.tokens} tokens, dim {DIM}, hidden {HIDDEN}, {args.experts} experts, top-{TOP_K}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| variant | weight bytes | forward ms | vs fp32 | fwd+bwd ms | vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = {b: statistics.median(times[("fp32", b)]) for b in (False, True)}
    for v, (layer, _, _) in runs.items():
        fwd, both = (statistics.median(times[(v, b)]) for b in (False, True))
        print(f"| {v} | {module_bytes(layer):,} | {fwd * 1e3:.1f} | {ref[False] / fwd:.2f}x | {both * 1e3:.1f} | "
              f"{ref[True] / both:.2f}x |")


if __name__ == "__main__":
    main()
