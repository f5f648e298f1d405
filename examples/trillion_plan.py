"""Plan a 1.12-trillion-parameter MoE on 10,000 GPUs, build it, and run one of its ranks for real.

1. The planner's table for the ``trillion`` preset (400 routed experts of 64 layers, top-8, one shared
   expert) on 10,000 GPUs as ep 400 x dp 25, 80 GiB each, bf16 weights, fully sharded dense weights,
   activation checkpointing and flash attention.
2. The model itself, built from ``lightning_moe.MoE`` layers on the meta device (no memory): its parameter
   count equals the planner's. Rank ``--rank`` of the 10,000 keeps its experts (the strategy's
   ``shard_moe_layer``, still on meta): the share it would materialise equals the planner's per-rank count.
   The full-size share (16 B parameters, mostly the replicated dense weights) is counted, not allocated.
3. The same structure scaled down to fit this machine (same 400 experts, top-8, shared expert, GQA 7:1,
   ep 400 x dp 25; width, depth and vocabulary reduced): rank ``--rank``'s share is materialised, seeded by
   global expert id, and trained for ``--steps`` steps of ``--seq-len`` tokens with its 399 EP peers
   simulated (``SimulatedExpertParallel``); measured peak memory, step time and all-to-all bytes are printed
   next to the planner's prediction for that layout (fp32, replicated, no recomputation).

About 1-2 minutes and 2.5 GiB on 2 CPU cores::

    python examples/trillion_plan.py
    python examples/trillion_plan.py --rank 0 --seq-len 512 --steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from lightning_moe.dry_run import shard_for_rank, simulate_step, simulation_layout
from lightning_moe.models import build_model, num_params
from lightning_moe.plan import PRESETS, Layout, count_params, params_per_rank, plan

GIB = 1024**3
TRILLION = PRESETS["trillion"]
# 10,000 GPUs of 80 GiB: 400-way expert parallel (one expert of each MoE layer per GPU), 25 copies of each.
LAYOUT = Layout(gpus=10_000, gpu_memory=80 * GIB, ep=400, activation_checkpointing=True, flash_attention=True)
# The trillion preset with its width (7168 -> 896), depth (64 -> 8), vocabulary and FFN widths divided by ~8,
# head_dim 128 and the 7:1 GQA ratio (7 heads, 1 kv head), 400 experts, top-8, one shared expert kept.
SCALED = dataclasses.replace(TRILLION, layers=8, dim=896, heads=7, kv_heads=1, vocab=32768, expert_hidden=256,
                             ffn_hidden=2304, name="trillion-scaled")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=4321, help="global rank of the 10,000 to play")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of the simulated step")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first is not timed)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"== 1. plan: {TRILLION.name} on {LAYOUT.gpus:,} GPUs ==")
    print(plan(TRILLION, LAYOUT).table())

    print(f"\n== 2. the {TRILLION.name} model on the meta device, rank {args.rank}'s share ==")
    start = time.perf_counter()
    model = build_model(TRILLION, device="meta")
    built = num_params(model)
    shards = shard_for_rank(model, args.rank, LAYOUT)
    per_rank = params_per_rank(TRILLION, LAYOUT)
    first = shards[0]
    print(f"built                  {built:,} parameters (planner {count_params(TRILLION).total:,}) "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"rank {args.rank:<17} ep_rank {first.ep_rank}: expert {first.offset} of each of {len(shards)} MoE "
          f"layers, {num_params(model):,} parameters to materialise (planner {per_rank.materialised:,}; "
          f"stored with sharded dense weights: {per_rank.stored:,})")
    if built != count_params(TRILLION).total or num_params(model) != per_rank.materialised:
        raise SystemExit("counts differ from the planner")
    del model

    layout = simulation_layout(LAYOUT, seq_len=args.seq_len, micro_batch=args.micro_batch)
    print(f"\n== 3. {SCALED.name} ({count_params(SCALED).total / 1e9:.2f} B parameters): rank {args.rank} for real, "
          f"{layout.micro_batch} x {layout.seq_len} tokens, fp32, {args.steps} steps ==")
    start = time.perf_counter()
    report = simulate_step(SCALED, layout, rank=args.rank, steps=args.steps, exact_rss=True)
    print(report.table())
    print(f"(simulation {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
