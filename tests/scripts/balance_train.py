"""Multi-process MoEStrategy runs of the loss-scope tests (tests/test_balance.py).

Usage: ``python balance_train.py '<json>'`` with ``{"devices": N, "runs": [{"name", "ep", "scope", "padding", "bias",
"accumulate"}, ...]}``; Lightning's popen launcher starts the other ranks. Every rank trains every run; rank 0 saves
``<name>.pt`` (the trained ``Net``'s state dict) and every rank writes what it observed to ``rank{r}.json``:
per run, how many all-reduces ``lightning_moe.module`` (bias balancing) issued, the layers' ``reduced_over`` in
training, whether the reduction was removed after ``fit``, and whether a layer deep-copies while installed.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import lightning_moe as lmoe  # noqa: E402
from lightning_moe.nn import LocalCountReduction  # noqa: E402

from balance_models import BalanceModel  # noqa: E402
from script_io import main, out_dir, write_result  # noqa: E402

MODULE_ALL_REDUCES = [0]
_all_reduce = dist.all_reduce


def _counting_all_reduce(*args, **kwargs):
    # Bias balancing's own all-reduce (lightning_moe/module.py), told apart from Lightning's and DDP's by its caller.
    if sys._getframe(1).f_globals.get("__name__") == "lightning_moe.module":
        MODULE_ALL_REDUCES[0] += 1
    return _all_reduce(*args, **kwargs)


dist.all_reduce = _counting_all_reduce


class Observe(Callback):
    """Records the layers' reduction state during training."""

    def __init__(self) -> None:
        self.reduced_over: list[int] = []
        self.deepcopy = "not tried"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reduced_over = [layer.reduced_over for layer in pl_module.net.layers()]
        if pl_module.net.moe1.expert_dispatcher is None and self.deepcopy == "not tried":
            try:
                copied = copy.deepcopy(pl_module.net.moe1)
                self.deepcopy = "ok" if copied.count_reduction is pl_module.net.moe1.count_reduction else "copied"
            except Exception as err:  # noqa: BLE001 - reported to the test
                self.deepcopy = repr(err)


def body() -> None:
    params = json.loads(sys.argv[1])
    results = {}
    rank = 0
    for run in params["runs"]:
        model = BalanceModel(scope=run["scope"], padding=run["padding"], bias_update_rate=run.get("bias", 0.0),
                             accumulate=run.get("accumulate", 1))
        observe = Observe()
        trainer = L.Trainer(accelerator="cpu", devices=params["devices"],
                            strategy=lmoe.MoEStrategy(expert_parallel_size=run["ep"]), max_steps=model.hparams.steps,
                            accumulate_grad_batches=run.get("accumulate", 1), use_distributed_sampler=False,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, callbacks=[observe])
        before = MODULE_ALL_REDUCES[0]
        trainer.fit(model)
        rank = trainer.global_rank
        if rank == 0:
            state = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
            torch.save(state, out_dir() / f"{run['name']}.pt")
        results[run["name"]] = {
            "module_all_reduces": MODULE_ALL_REDUCES[0] - before,
            "reduced_over": observe.reduced_over,
            "removed_after_fit": all(isinstance(layer.count_reduction, LocalCountReduction)
                                     for layer in model.net.layers()),
            "deepcopy": observe.deepcopy,
        }
    write_result(results, rank=rank)


if __name__ == "__main__":
    main(body)
