"""Multi-process scenarios of issue 14's defects, for tests/test_hardening.py.

Usage: ``python hardening.py <scenario> '<json params>'``; Lightning's popen launcher starts the other
rank (it re-runs this command line with ``LOCAL_RANK=1``). Each rank writes ``rank{r}.json`` through
:mod:`script_io`; tensors go to ``*.pt`` files in the output folder, written by rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from script_io import main, out_dir, write_result  # noqa: E402

PARAMS: dict = {}


def trainer(devices: int = 2, **kwargs):
    import lightning.pytorch as L

    kwargs.setdefault("strategy", "moe")
    kwargs.setdefault("max_steps", 5)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("reload_dataloaders_every_n_epochs", 1)  # one step an epoch (ep_models.Model)
    return L.Trainer(accelerator="cpu", devices=devices, use_distributed_sampler=False, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def save_state(tr, model, name: str) -> None:
    if tr.global_rank == 0:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_dir() / f"{name}.pt")


# -- defect 2: manual optimization -------------------------------------------------------------------


def manual() -> None:
    """Two half-loss ``manual_backward`` calls per optimizer step (Lightning's manual accumulation)."""
    from torch import nn

    from ep_models import Model

    class Manual(Model):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            half = x.shape[0] // 2
            for rows in (slice(0, half), slice(half, None)):
                self.manual_backward(0.5 * nn.functional.mse_loss(self(x[rows]), y[rows]))
            if PARAMS.get("clip"):
                self.clip_gradients(opt, gradient_clip_val=PARAMS["clip"], gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()

    model = Manual()
    tr = trainer()
    tr.fit(model)
    save_state(tr, model, "manual")
    write_result({"steps": tr.global_step}, rank=tr.global_rank)


# -- defect 3: a save after test / validate / predict ---------------------------------------------------------


def save_after_stages() -> None:
    """fit with Adam at ep=2, save; test, save; validate and predict, save: three equal checkpoints."""
    from ep_models import Model, eval_loader

    model = Model(adam=True, lr=0.01)
    tr = trainer()
    tr.fit(model)
    tr.save_checkpoint(out_dir() / "after_fit.ckpt")
    rank, world = tr.global_rank, tr.world_size
    tr.test(model, dataloaders=eval_loader(rank, world), verbose=False)
    tr.save_checkpoint(out_dir() / "after_test.ckpt")
    tr.validate(model, dataloaders=eval_loader(rank, world), verbose=False)
    tr.predict(model, dataloaders=eval_loader(rank, world))
    tr.save_checkpoint(out_dir() / "after_predict.ckpt")
    write_result({"steps": tr.global_step}, rank=rank)


SCENARIOS = {"manual": manual, "save_after_stages": save_after_stages}


def body() -> None:
    PARAMS.update(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    SCENARIOS[sys.argv[1]]()


if __name__ == "__main__":
    main(body)
