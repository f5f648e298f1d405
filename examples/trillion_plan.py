"""Plan a 1.12-trillion-parameter MoE on 10,000 GPUs, build it, and run one of its ranks for real, through the Trainer.

1. The planner's table for the ``trillion`` preset (400 routed experts of 64 layers, top-8, one shared expert) on
   10,000 GPUs as ep 400 x dp 25, 80 GiB each, bf16 weights, fully sharded dense weights, activation
   checkpointing and flash attention.
2. The model itself, built from ``lightning_moe.MoE`` layers on the meta device (no memory): its parameter count
   equals the planner's, and rank ``--rank``'s expert share (the strategy's ``shard_moe_layer``, still on meta)
   equals the planner's per-rank count.
3. Rank ``--rank`` of the 10,000 through the real ``Trainer(strategy=MoEStrategy(expert_parallel_size=400,
   data_parallel="fsdp"))``, on torch's fake process group (one process plays the rank; collectives complete
   and move no data; the expert-parallel exchange mirrors this rank's counts, see
   ``lightning_moe.distributed.fake``). The model is a width-scaled copy of the preset: the same 400 experts,
   top-8, GQA 7:1 and ep 400 x dp 25, width 900 and expert width 250 (so that dp 25 divides them: FSDP2
   shards each expert on a dim after the expert dim, evenly), 8 layers, a 32k vocabulary, and no shared expert
   (a stacked ``[1, D, H]`` tensor sharded over 10,000 ranks pads to 10,000 rows). It is built on meta in
   ``configure_model``; the strategy shards it (FSDP2 over the 10,000 ranks for dense weights, over the 25 ranks
   holding the same experts for experts) and materialises only this rank's shards, then one training step runs
   (forward, backward, AdamW, fp32). Measured against planned: bytes of parameters, gradients and optimizer
   states (sums of local shard sizes), peak memory (those bytes plus the growth of RSS over the step) and
   all-to-all bytes; ``--json PATH`` writes them.

About 2 minutes and 2 GiB on 2 CPU cores::

    python examples/trillion_plan.py --json trillion.json
    python examples/trillion_plan.py --rank 0 --seq-len 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_moe import MoEStrategy
from lightning_moe.distributed import fake
from lightning_moe.distributed.fsdp import is_dtensor
from lightning_moe.dry_run import shard_for_rank
from lightning_moe.memory import mmap_large_allocations, peak_rss_bytes, reset_peak_rss, rss_bytes
from lightning_moe.models import Transformer, build_model, num_params
from lightning_moe.plan import PRESETS, Architecture, Layout, count_params, params_per_rank, plan

GIB = 1024**3
TRILLION = PRESETS["trillion"]
# 10,000 GPUs of 80 GiB: 400-way expert parallel (one expert of each MoE layer per GPU), 25 copies of each.
LAYOUT = Layout(gpus=10_000, gpu_memory=80 * GIB, ep=400, activation_checkpointing=True, flash_attention=True)
SCALED = dataclasses.replace(TRILLION, layers=8, dim=900, heads=7, kv_heads=1, head_dim=128, vocab=32768,
                             expert_hidden=250, ffn_hidden=2304, shared_experts=0, name="trillion-scaled")
KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_bytes", "all_to_all_bytes")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=4321, help="global rank of the 10,000 to play")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of the training step")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="write measured vs planned bytes as JSON")
    return parser.parse_args(argv)


class ScaledLM(L.LightningModule):
    """Next-token loss of the package transformer, built in ``configure_model`` (on meta under FSDP)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.model: Transformer | None = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = Transformer(self.arch)

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + self.model.aux_loss()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def local_bytes(tensors) -> int:
    return sum((t.to_local() if is_dtensor(t) else t).nbytes for t in tensors)


class Measure(Callback):
    """This rank's shard bytes and the step's peak (bytes held at its start plus the growth of RSS over it)."""

    def __init__(self) -> None:
        self.measured: dict[str, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.measured["param_bytes"] = local_bytes(pl_module.parameters())
        for d in self.dispatchers(pl_module):
            d.reset_counters()
        self.start = rss_bytes()
        reset_peak_rss()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.measured["grad_bytes"] = local_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        states = [v for st in trainer.optimizers[0].state.values() for v in st.values() if isinstance(v, Tensor)]
        self.measured["optimizer_bytes"] = local_bytes(states)
        self.measured["peak_bytes"] = self.measured["param_bytes"] + peak_rss_bytes() - self.start
        self.measured["all_to_all_bytes"] = sum(d.bytes_sent for d in self.dispatchers(pl_module))

    @staticmethod
    def dispatchers(module) -> list:
        return [m.dispatcher for m in module.modules() if isinstance(getattr(m, "dispatcher", None),
                                                                        fake.FakeBackendDispatcher)]


def one_rank_of_ten_thousand(rank: int, micro_batch: int, seq_len: int) -> dict:
    """Rank ``rank`` of ``LAYOUT`` through the Trainer on the fake backend: one step, measured vs planned."""
    mmap_large_allocations()  # freed tensors leave RSS at once: RSS follows live memory
    fake.init_fake_process_group(rank, LAYOUT.gpus)
    os.environ.update(LOCAL_RANK="0", NODE_RANK=str(rank))  # Lightning: this process is node `rank` of 10,000
    L.seed_everything(0, verbose=False)
    tokens = torch.randint(SCALED.vocab, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(rank))
    measure = Measure()
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=LAYOUT.gpus, max_steps=1, callbacks=[measure],
                        strategy=MoEStrategy(expert_parallel_size=LAYOUT.ep, data_parallel="fsdp"),
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert trainer.global_rank == rank and trainer.world_size == LAYOUT.gpus
    trainer.fit(ScaledLM(SCALED), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens)))
    layout = dataclasses.replace(LAYOUT, dense_sharding="fsdp", expert_sharding="fsdp", weight_dtype="fp32",
                                 grad_dtype="fp32", optim_dtype="fp32", act_dtype="fp32", master_weights=False,
                                 activation_checkpointing=False, micro_batch=micro_batch, seq_len=seq_len)
    planned = plan(SCALED, layout, rank=rank)
    planned_bytes = {"param_bytes": planned.param_bytes, "grad_bytes": planned.grad_bytes,
                     "optimizer_bytes": planned.optimizer_bytes, "peak_bytes": planned.total_bytes,
                     "all_to_all_bytes": planned.all_to_all_bytes}
    return {"world_size": trainer.world_size, "rank": trainer.global_rank, "strategy": "moe_fsdp",
            "data_parallel": trainer.strategy.data_parallel,
            **{k: {"measured": int(measure.measured[k]), "planned": int(planned_bytes[k])} for k in KEYS}}


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
          f"layers, {num_params(model):,} parameters unsharded (planner {per_rank.materialised:,}; "
          f"stored with sharded dense weights: {per_rank.stored:,})")
    if built != count_params(TRILLION).total or num_params(model) != per_rank.materialised:
        raise SystemExit("counts differ from the planner")
    del model, shards

    print(f"\n== 3. {SCALED.name} ({count_params(SCALED).total / 1e9:.2f} B parameters): rank {args.rank} of "
          f"{LAYOUT.gpus:,} through the Trainer, MoEStrategy(expert_parallel_size={LAYOUT.ep}, data_parallel='fsdp'), "
          f"fake process group, {args.micro_batch} x {args.seq_len} tokens, one step ==")
    start = time.perf_counter()
    report = one_rank_of_ten_thousand(args.rank, args.micro_batch, args.seq_len)
    for key in KEYS:
        measured, planned = report[key]["measured"], report[key]["planned"]
        print(f"{key:<22} {measured:>15,} measured {planned:>15,} planned   ratio {measured / max(planned, 1):.4f}")
    print(f"(step and set-up {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
