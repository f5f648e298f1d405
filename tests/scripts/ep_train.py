"""Multi-process MoEStrategy runs for tests/test_strategy_integration.py.

Usage: ``python ep_train.py <suite> <out_dir>`` (Lightning's popen launcher starts the other rank)
or ``torchrun --nproc-per-node N ep_train.py <suite> <out_dir>``. Every rank runs every scenario of
the suite; rank 0 writes results to ``<out_dir>`` (``*.pt`` state dicts, ``results.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

import lightning_moe as lmoe  # noqa: E402
from lightning_moe.distributed.expert_parallel import expert_parameters  # noqa: E402

from ep_models import STEPS, BalancedModel, Model, eval_loader, probe_input  # noqa: E402

OUT = Path(sys.argv[2])
WORLD = int(os.environ.get("LOCAL_WORLD_SIZE", 2))  # devices under torchrun
RESULTS: dict = {}


def trainer(devices: int | str = "auto", **kwargs) -> L.Trainer:
    strategy = kwargs.pop("strategy", "moe")
    kwargs.setdefault("max_steps", STEPS)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("reload_dataloaders_every_n_epochs", 1)  # one step an epoch, see Model.train_dataloader
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, use_distributed_sampler=False,
                     logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def save_weights(tr: L.Trainer, model: L.LightningModule, name: str) -> None:
    if tr.global_rank == 0:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, OUT / f"{name}.pt")


class ExpertCount(Callback):
    """Records the expert parameter count each rank holds while training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        count = torch.tensor([sum(p.numel() for p in expert_parameters(pl_module))])
        counts = trainer.strategy.all_gather(count).reshape(-1).tolist()
        RESULTS["expert_numel_per_rank"] = counts


def bad_sizes(tag: str, **kwargs) -> None:
    model_kwargs = kwargs.pop("model", {})
    try:
        trainer(**kwargs).fit(Model(**model_kwargs))
        RESULTS[tag] = "no error"
    except ValueError as err:
        RESULTS[tag] = str(err)


def suite_main() -> None:
    bad_sizes("bad_world", strategy=lmoe.MoEStrategy(expert_parallel_size=3), devices=2)
    bad_sizes("bad_experts", strategy=lmoe.MoEStrategy(expert_parallel_size=2), devices=2, model={"num_experts": 3})

    # ep=2, 5 steps; a ModelCheckpoint at step 3 saves while sharded; save again after fit.
    model = Model()
    ckpt = ModelCheckpoint(dirpath=OUT, filename="ep2-step{step}", every_n_train_steps=3, save_top_k=-1)
    tr = trainer(2, strategy=lmoe.MoEStrategy(expert_parallel_size=2), callbacks=[ExpertCount(), ckpt],
                 enable_checkpointing=True)
    tr.fit(model)
    RESULTS["full_expert_numel"] = sum(p.numel() for p in expert_parameters(model))
    save_weights(tr, model, "ep2")
    tr.save_checkpoint(OUT / "ep2_final.ckpt")
    if tr.global_rank == 0:
        model.eval()
        with torch.no_grad():
            torch.save(model(probe_input()), OUT / "ep2_probe.pt")

    # validate / test / predict at ep=2 on the trained model (sharded again, then given back whole).
    tr = trainer(2, strategy=lmoe.MoEStrategy(expert_parallel_size=2))
    rank, world = tr.global_rank, tr.world_size
    RESULTS["val_loss"] = tr.validate(model, dataloaders=eval_loader(rank, world), verbose=False)[0]["val_loss"]
    RESULTS["test_loss"] = tr.test(model, dataloaders=eval_loader(rank, world), verbose=False)[0]["test_loss"]
    predictions = tr.predict(model, dataloaders=eval_loader(rank, world))
    if rank == 0:
        torch.save(torch.cat(predictions), OUT / "predict_rank0.pt")
    RESULTS["whole_after_predict"] = model.net.moe1.experts.w1.shape[0]

    # bf16-mixed: tokens travel in bfloat16.
    tr = trainer(2, max_steps=2, precision="bf16-mixed")
    bf16 = Model()
    tr.fit(bf16)
    RESULTS["bf16_steps"] = tr.global_step
    RESULTS["bf16_finite_and_moved"] = bool(all(p.isfinite().all() for p in bf16.parameters())
                                            and not torch.equal(bf16.net.moe1.experts.w1, Model().net.moe1.experts.w1))

    # ep=1 (experts replicated, still outside DDP).
    model = Model()
    tr = trainer(2, strategy=lmoe.MoEStrategy(expert_parallel_size=1))
    tr.fit(model)
    save_weights(tr, model, "ep1")

    # Resume the step-3 checkpoint (saved at ep=2) at ep=1.
    model = Model()
    tr = trainer(2, strategy=lmoe.MoEStrategy(expert_parallel_size=1))
    tr.fit(model, ckpt_path=OUT / "ep2-stepstep=3.ckpt")
    save_weights(tr, model, "resume_ep1")

    # Gradient accumulation and norm clipping at ep=2.
    model = Model(steps=3, accumulate=2)
    tr = trainer(2, max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.05)
    tr.fit(model)
    save_weights(tr, model, "accum_clip")


def suite_aux() -> None:
    # The equivalence of suite_main with the default aux/z coefficients and loss scope ("global"), ep=2 and ep=1.
    for ep in (2, 1):
        model = Model(aux_losses=True)
        tr = trainer(2, strategy=lmoe.MoEStrategy(expert_parallel_size=ep))
        tr.fit(model)
        save_weights(tr, model, f"aux_ep{ep}")


def suite_torchrun() -> None:
    # Sharded (DCP) checkpoints with Adam at ep=2, resumed at ep=1 into the full format.
    model = Model(adam=True, lr=0.01)
    ckpt = ModelCheckpoint(dirpath=OUT, filename="adam-step{step}", every_n_train_steps=3, save_top_k=-1)
    tr = trainer(WORLD, strategy=lmoe.MoEStrategy(checkpoint="sharded"), callbacks=[ckpt], enable_checkpointing=True)
    tr.fit(model)
    RESULTS["sharded_after_fit"] = model.net.moe1.expert_dispatcher is not None
    tr.save_checkpoint(OUT / "adam_final")

    model = Model(adam=True, lr=0.01)
    tr = trainer(WORLD, strategy=lmoe.MoEStrategy(expert_parallel_size=1))
    tr.fit(model, ckpt_path=OUT / "adam-stepstep=3.ckpt")
    save_weights(tr, model, "adam_resume_ep1")

    # MoELightningModule: expert_bias balanced from counts summed over every rank.
    model = BalancedModel()
    tr = trainer(WORLD)
    tr.fit(model)
    save_weights(tr, model, "balanced")
    biases = tr.strategy.all_gather(torch.stack([model.net.moe1.expert_bias, model.net.moe2.expert_bias]))
    RESULTS["expert_bias_equal_on_ranks"] = bool((biases == biases[0]).all())


def suite_world4() -> None:
    model = Model()
    tr = trainer(4, strategy=lmoe.MoEStrategy(expert_parallel_size=2))
    tr.fit(model)
    save_weights(tr, model, "w4_ep2")
    RESULTS["mesh"] = tr.strategy.device_mesh.mesh.tolist()

    model = Model()
    tr = trainer(4, strategy=lmoe.MoEStrategy(expert_parallel_size=4))
    tr.fit(model, ckpt_path=os.environ["RESUME_CKPT"])
    save_weights(tr, model, "w4_resume_ep4")


def suite_spawn() -> None:
    # The spawn launcher copies rank 0's weights back into this (main) process: they must be the whole model.
    model = Model()
    trainer(2, strategy="moe_spawn").fit(model)
    torch.save(model.state_dict(), OUT / "spawn.pt")


def suite_fail() -> None:
    class Failing(Model):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1 and self.global_rank == 0:
                raise RuntimeError("rank 0 fails on purpose")
            if self.global_step == 1:
                time.sleep(300)  # rank 1 waits outside any collective (as it would in an NCCL kernel)
            return super().training_step(batch, batch_idx)

    trainer(2).fit(Failing())


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    {"main": suite_main, "aux": suite_aux, "torchrun": suite_torchrun, "world4": suite_world4, "spawn": suite_spawn,
     "fail": suite_fail}[sys.argv[1]]()
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 or not os.environ.get("LOCAL_RANK"):
        if RESULTS:
            (OUT / f"{sys.argv[1]}.json").write_text(json.dumps(RESULTS))
