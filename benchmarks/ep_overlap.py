"""Expert parallelism on 2 gloo ranks against the same 2 ranks holding every expert: one MoE layer, fwd+bwd.

Each of the 2 ranks (this script starts them itself) routes its own 4096 tokens (dim 256, GELU experts of
width 1024, top-2, dropless) through two copies of the same layer:

- ``local``: the rank holds all experts and runs the layer alone (what data parallelism does, without the
  gradient all-reduce, which neither variant has);
- ``ep 2``: the experts are sharded over the 2 ranks (:func:`lightning_moe.distributed.shard_moe_layer`):
  counts and rows travel by all-to-all, each rank runs its half of the experts on the rows of both, its own
  rows while the others travel (:mod:`lightning_moe.distributed.overlap`), forward and backward;
- ``ep 2 seq``: the same without overlap (``ExpertParallelDispatcher(overlap=False)``: each exchange waited
  for before the experts run, rows regrouped by expert, autograd running the reverse).

Steps are interleaved in time (order rotated each round), each started on both ranks together (a barrier);
a step's time is the slower rank's (the step is done when both are). The table gives medians of wall and
CPU time (CPU: process time of the rank, gloo's threads included, the larger of the two ranks) and the
median over rounds of the per-round ratio ``ep / local``.

Usage: ``python benchmarks/ep_overlap.py [--experts 8 64] [--repeats 15] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from lightning_moe import MoE  # noqa: E402
from lightning_moe.distributed import ExpertParallelDispatcher, shard_moe_layer  # noqa: E402

TOKENS, DIM, HIDDEN, TOP_K, RANKS = 4096, 256, 1024, 2, 2


def _step(layer: MoE, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    out = layer(x)
    (out.float().pow(2).mean() + layer.aux_loss).backward()
    layer.zero_grad(set_to_none=True)


def _rank(rank: int, store: str, experts: int, repeats: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=RANKS)
    torch.manual_seed(0)  # the same layer on both ranks
    local = MoE(DIM, experts, top_k=TOP_K, hidden_dim=HIDDEN)
    sharded, sequential = (MoE(DIM, experts, top_k=TOP_K, hidden_dim=HIDDEN) for _ in range(2))
    for layer in (sharded, sequential):
        layer.load_state_dict(local.state_dict())
        shard = shard_moe_layer(layer, "", ep_rank=rank, ep_size=RANKS, group=dist.group.WORLD)
    sequential.expert_dispatcher = ExpertParallelDispatcher(shard, dist.group.WORLD, overlap=False)
    x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(rank))  # each rank its own tokens
    variants = {"local": local, "ep 2": sharded, "ep 2 seq": sequential}
    for layer in variants.values():  # warm-up
        _step(layer, x)
        _step(layer, x)
    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in variants}
    for r in range(repeats):
        names = list(variants)
        for name in names[r % len(names):] + names[: r % len(names)]:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(variants[name], x)
            done = torch.tensor([time.perf_counter() - start, time.process_time() - start_cpu], dtype=torch.float64)
            dist.all_reduce(done, op=dist.ReduceOp.MAX)  # the step ends when the slower rank is done
            times[name]["wall"].append(float(done[0]))
            times[name]["cpu"].append(float(done[1]))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def measure(experts: int, repeats: int, threads: int) -> dict:
    """Start the 2 ranks; per variant the median wall/CPU seconds and the median per-round ratio to ``local``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_rank, args=(os.path.join(tmp, "store"), experts, repeats, threads, out),
                           nprocs=RANKS, start_method="spawn")
        with open(out) as f:
            times = json.load(f)
    result = {}
    for name, series in times.items():
        result[name] = {k: statistics.median(v) for k, v in series.items()}
        for key in ("wall", "cpu"):
            result[name][f"{key}_x"] = statistics.median(
                a / b for a, b in zip(series[key], times["local"][key], strict=True))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (2 ranks share the CPU)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {RANKS} gloo ranks x {args.threads} threads, {TOKENS} tokens per rank, "
          f"dim {DIM}, hidden {HIDDEN}, top-{TOP_K}, dropless; load average {os.getloadavg()[0]:.1f}; "
          f"{args.repeats} interleaved rounds")
    header = f"| {'E':>3} | {'variant':>8} | {'wall ms':>8} | {'x local':>7} | {'CPU ms':>8} | {'x local':>7} |"
    print(header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    results = {}
    for experts in args.experts:
        results[experts] = measure(experts, args.repeats, args.threads)
        for name, t in results[experts].items():
            print(f"| {experts:>3} | {name:>8} | {1e3 * t['wall']:>8.1f} | {t['wall_x']:>7.2f} "
                  f"| {1e3 * t['cpu']:>8.1f} | {t['cpu_x']:>7.2f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
