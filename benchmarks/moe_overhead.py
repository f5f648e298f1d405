"""Where an MoE layer's time goes beyond its expert GEMMs, at the examples' language-model size.

One layer forward + backward on 2048 tokens of width 128 (the batch of ``benchmarks/train_step.py``), four
variants interleaved in one process, medians:

- ``dense``: the dense GELU MLP of width 512 (:class:`lightning_moe.models.DenseFFN`);
- ``moe``: :class:`lightning_moe.MoE`, 8 GELU experts of width 256, top-2 (equal active parameters), with
  its balancing and z-losses in the backward;
- ``experts``: the layer's fused gather + experts + combine alone (``nn/ops``), on a fixed routing;
- ``loop``: the expert GEMMs alone, one ``mm`` per expert and weight on balanced pre-sorted rows.

``moe - experts`` is the routing (router GEMM, softmax, top-k, sort, losses, statistics); ``experts - loop``
the gathers, scaling and combines. Single-threaded by default: the split is stable on a shared machine.

Usage: ``python benchmarks/moe_overhead.py [--threads 1] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lightning_moe import MoE  # noqa: E402
from lightning_moe.models import DenseFFN  # noqa: E402
from lightning_moe.nn.ops import routed_mlp  # noqa: E402

TOKENS, DIM, EXPERTS, TOP_K, HIDDEN = 2048, 128, 8, 2, 256


def variants() -> dict:
    torch.manual_seed(0)
    x = torch.randn(TOKENS, DIM, requires_grad=True)
    dense = DenseFFN(DIM, HIDDEN * TOP_K, "gelu")
    layer = MoE(DIM, EXPERTS, TOP_K, hidden_dim=HIDDEN, activation="gelu", aux_loss_coef=1e-2)
    bank = layer.experts
    ids_N = torch.randn(TOKENS, EXPERTS).topk(TOP_K, -1).indices.t().reshape(-1)
    order_N = torch.argsort(ids_N, stable=True)
    token_N, weights_N = order_N % TOKENS, torch.rand(TOKENS * TOP_K)[order_N]
    counts = torch.bincount(ids_N, minlength=EXPERTS).tolist()
    rows = TOKENS * TOP_K // EXPERTS
    x_MD = torch.randn(rows * EXPERTS, DIM, requires_grad=True)
    w1 = [torch.randn(DIM, HIDDEN, requires_grad=True) for _ in range(EXPERTS)]
    w2 = [torch.randn(HIDDEN, DIM, requires_grad=True) for _ in range(EXPERTS)]

    def loop() -> None:
        ys = [F.gelu(x_CD @ w1[e]) @ w2[e] for e, x_CD in enumerate(x_MD.split(rows))]
        torch.cat(ys).sum().backward()

    return {
        "dense": lambda: dense(x).sum().backward(),
        "moe": lambda: (layer(x).sum() + layer.aux_loss).backward(),
        "experts": lambda: routed_mlp(x, token_N, weights_N, counts, bank.w1, bank.w2).sum().backward(),
        "loop": loop,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fns = variants()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.repeats + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {args.threads} thread(s), one layer fwd+bwd, {TOKENS} tokens x {DIM}, "
          f"{EXPERTS} experts x {HIDDEN} top-{TOP_K} vs dense {HIDDEN * TOP_K}; medians of {args.repeats}")
    for name, ms in medians.items():
        print(f"{name:>8} {ms:8.2f} ms  {ms / medians['dense']:.2f}x dense")
    print(f"routing (moe - experts) {medians['moe'] - medians['experts']:.2f} ms; "
          f"gather/combine (experts - loop) {medians['experts'] - medians['loop']:.2f} ms")
    return medians


if __name__ == "__main__":
    main()
