"""Forward+backward of one MoE layer against the GEMM floor and fairscale, as ratios in one run.

Work: top-2, 4096 tokens, dim 256, hidden 1024, GELU, dropless, 8 and 64 experts.

- ``floor``: the same expert GEMMs as one ``torch.bmm`` over perfectly balanced, pre-sorted tokens
  (``[E, T*k/E, D]``): what any MoE layer must at least pay; no routing, no dispatch.
- ``ours``: ``lightning_moe.MoE`` (router, sort-based dispatch, per-expert GEMMs, combine, losses).
- ``fairscale``: ``fairscale.nn.MOELayer`` + ``Top2Gate`` (one-hot einsum dispatch), the same expert
  MLPs (the package's ``DenseFFN``, one module per expert), in a 1-process gloo group. Its capacity is
  ``2T/E`` (it drops overflow; ours drops nothing).

Times are medians of interleaved repeats in one process; peak memory is measured per
implementation in its own subprocess as the growth of peak RSS over the RSS before the step.

Usage: ``python benchmarks/moe_layer.py [--experts 8 64] [--repeats 7] [--dtype float32|bfloat16]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from lightning_moe.models import DenseFFN

TOKENS, DIM, HIDDEN, TOP_K = 4096, 256, 1024, 2


class Floor(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts, DIM, HIDDEN) / DIM**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, HIDDEN, DIM) / HIDDEN**0.5)

    def forward(self, x_ECD: torch.Tensor) -> torch.Tensor:
        return torch.bmm(F.gelu(torch.bmm(x_ECD, self.w1)), self.w2)


def build(name: str, experts: int, dtype: torch.dtype):
    """Return ``(module, input)`` for one implementation."""
    if name == "floor":
        return Floor(experts).to(dtype), torch.randn(experts, TOKENS * TOP_K // experts, DIM, dtype=dtype)
    x = torch.randn(TOKENS // 8, 8, DIM, dtype=dtype)  # [S, B, D]: fairscale wants 3-D input
    if name == "ours":
        from lightning_moe import MoE

        return MoE(DIM, experts, top_k=TOP_K, hidden_dim=HIDDEN, activation="gelu").to(dtype), x
    if name == "fairscale":
        import torch.distributed as dist
        from fairscale.nn import MOELayer, Top2Gate

        if not dist.is_initialized():
            store = os.path.join(tempfile.mkdtemp(), "store")
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        layer = MOELayer(Top2Gate(DIM, experts), nn.ModuleList(DenseFFN(DIM, HIDDEN, "gelu") for _ in range(experts)))
        return layer.to(dtype), x
    raise ValueError(f"unknown implementation {name!r}")


def step(module: nn.Module, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    y = module(x)
    loss = y.float().pow(2).mean()
    for attr in ("aux_loss", "l_aux"):
        if isinstance(getattr(module, attr, None), torch.Tensor):
            loss = loss + getattr(module, attr).float()
    loss.backward()
    module.zero_grad(set_to_none=True)


def measure_memory(name: str, experts: int, dtype: str) -> int:
    """Peak RSS growth (bytes) of one forward+backward, in a fresh subprocess."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, str(experts), dtype],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _memory_child(name: str, experts: int, dtype: str) -> None:
    torch.manual_seed(0)
    module, x = build(name, experts, getattr(torch, dtype))
    step(module, x)  # first step allocates grads once; measure the second, steady-state one
    module.zero_grad(set_to_none=False)
    before = rss_bytes()
    reset_peak_rss()
    step(module, x)
    print(peak_rss_bytes() - before)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-fairscale", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        name, experts, dtype = args.memory_child
        _memory_child(name, int(experts), dtype)
        return {}

    names = ["floor", "ours"] + ([] if args.no_fairscale else ["fairscale"])
    dtype = getattr(torch, args.dtype)
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{TOKENS} tokens, dim {DIM}, hidden {HIDDEN}, top-{TOP_K}, dropless")
    header = f"{'experts':>7} | {'impl':>9} | {'ms':>8} | {'x floor':>7} | {'peak MB':>8} | {'mem x floor':>11}"
    print(header + "\n" + "-" * len(header))
    for experts in args.experts:
        torch.manual_seed(0)
        built = {name: build(name, experts, dtype) for name in names}
        for name in names:  # warm-up
            step(*built[name])
            step(*built[name])
        times = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                start = time.perf_counter()
                step(*built[name])
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        mem = {name: measure_memory(name, experts, args.dtype) for name in names}
        for name in names:
            print(f"{experts:>7} | {name:>9} | {ms[name]:>8.1f} | {ms[name] / ms['floor']:>7.2f} | "
                  f"{mem[name] / 2**20:>8.1f} | {mem[name] / max(mem['floor'], 1):>11.2f}")
        if "fairscale" in names:
            print(f"{'':>7}   fairscale / ours: {ms['fairscale'] / ms['ours']:.2f}x slower")
        results[experts] = {"ms": ms, "peak_bytes": mem}
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
