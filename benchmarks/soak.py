"""Soak: does a long strategy="moe" run hold on to memory? RSS of each rank over N steps on 2 gloo processes.

Trains TinyMoE (2 MoE layers, aux + z losses, aux-loss-free bias balancing, an ExpertLoad metric updated every
step, the base class's per-step logging) at ep=2 for ``--steps`` steps and samples each rank's resident set
size (``/proc/self/statm``) every ``--every`` steps. A least-squares line through the samples after
``--warmup`` steps gives the growth in MiB per 100 steps: a graph kept alive by an aux loss, a routing stat or a
metric state shows up as a steady slope. Issue 14 asks for under 1 MiB per 100 steps after warm-up.

    python benchmarks/soak.py                       # 1,000 steps, warm-up 200 (the README figure)
    python benchmarks/soak.py --steps 300 --warmup 100 --out soak.json

Lightning's popen launcher starts rank 1 by running this file again; rank 0 prints the result and writes
``--out`` (JSON: slope per rank, samples).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import lightning.pytorch as L  # noqa: E402
import torch.distributed as dist  # noqa: E402

import lightning_moe  # noqa: E402, F401  (registers strategy="moe")
from lightning_moe.memory import rss_bytes  # noqa: E402
from lightning_moe.metrics import ExpertLoad  # noqa: E402

from helpers import RegressionData, TinyMoE  # noqa: E402


def rss_mib() -> float:
    return rss_bytes() / 2**20


def slope_per_100_steps(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MiB) against step, times 100."""
    steps = torch.tensor([s for s, _ in samples], dtype=torch.float64)
    rss = torch.tensor([r for _, r in samples], dtype=torch.float64)
    steps_c = steps - steps.mean()
    return float((steps_c * (rss - rss.mean())).sum() / (steps_c * steps_c).sum() * 100)


class SoakModel(TinyMoE):
    def __init__(self) -> None:
        super().__init__(num_experts=4, bias_update_rate=0.01, optimizer="adam", lr=0.01)
        self.load = ExpertLoad(num_experts=4)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.load.update(self.layers[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("expert_load_max", self.load.compute().max().float(), sync_dist=True)
        self.load.reset()


class Sampler(L.Callback):
    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.samples.append((trainer.global_step, rss_mib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    sampler = Sampler(args.every)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="moe", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[sampler])
    data = RegressionData(n=256, batch_size=8, offset=1.5, seed=int(os.environ.get("LOCAL_RANK", 0)))
    trainer.fit(SoakModel(), datamodule=data)

    after = [s for s in sampler.samples if s[0] >= args.warmup]
    gathered: list = [None] * trainer.world_size
    dist.all_gather_object(gathered, {"slope": slope_per_100_steps(after), "samples": sampler.samples})
    if trainer.global_rank == 0:
        result = {"steps": args.steps, "warmup": args.warmup, "slope_mib_per_100_steps": [g["slope"] for g in gathered],
                  "rss_mib_first_last": [[g["samples"][0][1], g["samples"][-1][1]] for g in gathered],
                  "samples": [g["samples"] for g in gathered]}
        print(f"soak: {args.steps} steps on 2 gloo ranks, strategy='moe': RSS slope after step {args.warmup} = "
              + ", ".join(f"rank {r}: {s:+.3f} MiB/100 steps" for r, s in enumerate(result["slope_mib_per_100_steps"]))
              + f"; RSS first/last (MiB): {result['rss_mib_first_last']}")
        if args.out is not None:
            args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
