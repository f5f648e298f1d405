"""ExpertPruning and ExpertMagnitudePruning on 2 processes, for tests/test_pruning.py.

Usage: ``python pruning.py ddp|ep`` (Lightning's popen launcher starts the other rank).

* ``ddp``: gloo DDP, each rank its own data; ExpertPruning keep=3 after epoch 0. Every rank writes the kept
  experts, its epoch-0 expert counts and (part of) its weights.
* ``ep``: ``strategy="moe"``, 4 of 8 experts a rank. First ExpertMagnitudePruning with ``last.ckpt`` in the
  output folder; then ExpertPruning keep=3 (-> 4) at lr=0, each rank its own data. Every rank writes the kept
  experts, its counts, its local expert shape and momentum before and after pruning, and whether the final
  model holds exactly the kept experts' initial weights.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_moe  # noqa: E402, F401  (registers strategy="moe")
from lightning_moe.callbacks import ExpertMagnitudePruning, ExpertPruning  # noqa: E402

from script_io import main, out_dir, write_result  # noqa: E402
from test_pruning import PruneModel, kill_experts, loader, trainer  # noqa: E402

# -- ddp ---------------------------------------------------------------------------------------------


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        return loader(seed=int(os.environ.get("LOCAL_RANK", 0)))  # each rank its own data


class DDPCounts(pl.Callback):
    counts = torch.zeros(8, dtype=torch.long)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.counts += pl_module.moe.tokens_per_expert


def ddp() -> None:
    torch.manual_seed(0)
    model = PruneModel()
    kill_experts(model)
    pruning, counts = ExpertPruning(keep=3, at_epoch=0), DDPCounts()
    t = trainer(strategy="ddp", devices=2, use_distributed_sampler=False, callbacks=[pruning, counts])
    t.fit(model, datamodule=Data())
    out = {"kept": pruning.kept["moe"], "counts": counts.counts.tolist(),
           "w1": model.moe.experts.w1.flatten()[:50].tolist(),
           "gate": model.moe.router.gate.weight.flatten().tolist()}
    write_result(out, rank=t.global_rank)


# -- ep ----------------------------------------------------------------------------------------------


class Counts(pl.Callback):
    counts = torch.zeros(8, dtype=torch.long)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.counts += pl_module.moe.tokens_per_expert

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.local_w1 = tuple(pl_module.moe.experts.w1.shape)
            self.momentum_after = momentum(trainer, pl_module)


class Before(pl.Callback):  # runs before ExpertPruning's epoch-end hook
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.momentum_before = momentum(trainer, pl_module)


def momentum(trainer, pl_module):
    return trainer.optimizers[0].state[pl_module.moe.experts.w1]["momentum_buffer"].flatten(1)[:, :8].tolist()


def ep() -> None:
    torch.manual_seed(0)
    model = PruneModel()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(out_dir()), save_last=True)
    t = trainer(strategy="moe", devices=2, max_epochs=1, use_distributed_sampler=False, enable_checkpointing=True,
                callbacks=[ExpertMagnitudePruning(amount=0.5), checkpoint])
    t.fit(model, loader())

    torch.manual_seed(1)
    model = PruneModel(lr=0.0)  # the weights stay as initialised: the pruned model must hold init[kept]
    kill_experts(model)
    init = {"w1": model.moe.experts.w1.detach().clone(), "gate": model.moe.router.gate.weight.detach().clone()}
    pruning, counts, before = ExpertPruning(keep=3, at_epoch=0), Counts(), Before()
    t = trainer(strategy="moe", devices=2, max_epochs=2, use_distributed_sampler=False,
                callbacks=[before, pruning, counts])
    t.fit(model, loader(seed=int(os.environ.get("LOCAL_RANK", 0))))  # each rank its own data
    kept = pruning.kept["moe"]
    out = {"kept": kept, "counts": counts.counts.tolist(), "local_w1": counts.local_w1,
           "momentum_before": before.momentum_before, "momentum_after": counts.momentum_after,
           "num_experts": model.moe.num_experts, "w1_full": tuple(model.moe.experts.w1.shape),
           "w1_ok": torch.equal(model.moe.experts.w1, init["w1"][kept]),
           "gate_ok": torch.equal(model.moe.router.gate.weight, init["gate"][kept])}
    write_result(out, rank=t.global_rank)


SCENARIOS = {"ddp": ddp, "ep": ep}


def body() -> None:
    SCENARIOS[sys.argv[1]]()


if __name__ == "__main__":
    main(body)
