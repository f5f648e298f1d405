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
            if PARAMS.get("hand_clip"):  # experts replicated (ep=1): a hand clip sees every expert
                torch.nn.utils.clip_grad_norm_(self.parameters(), PARAMS["hand_clip"])
            opt.step()
            opt.zero_grad()

    import lightning_moe as lmoe

    model = Manual()
    tr = trainer(strategy=lmoe.MoEStrategy(expert_parallel_size=PARAMS.get("ep")))
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


# -- defect 4: optimizer-state gathering ---------------------------------------------------------------------

DEAD, REVIVE = 3, 2  # template expert 3 of net.moe2 (on rank 1 at ep=2) gets no token before step 2


def optimizer_model(optimizer: str):
    """ep_models.Model with Adam (large eps) or Adafactor, and expert biases (used to starve an expert)."""
    from ep_models import Model

    class OptimizerModel(Model):
        def configure_optimizers(self):
            if optimizer == "adafactor":
                return torch.optim.Adafactor(self.parameters(), lr=0.01)
            return torch.optim.Adam(self.parameters(), lr=0.01, eps=1e-3)

    return OptimizerModel(bias_update_rate=1e-3)  # the rate only enables expert_bias; nothing updates it


def starve_callback():
    """Sets ``expert_bias[DEAD] = -1e4`` in net.moe2 before steps < REVIVE (no token reaches it), 0 after."""
    import lightning.pytorch as L

    class Starve(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            bias = pl_module.net.moe2.router.expert_bias
            bias.zero_()
            if trainer.global_step < REVIVE:
                bias[DEAD] = -1e4

    return Starve()


def dump_local_optimizer_state(strategy, module, optimizer) -> dict:
    """This rank's optimizer state by logical parameter name: ``{name: (first expert row or -1, {key: value})}``."""
    from lightning_moe.distributed.shard_layout import GROUPED, OptimizerLayout

    layout = strategy._layout()
    olayout = OptimizerLayout(optimizer, module, layout)
    out = {}
    for idx, name in enumerate(olayout.local_names):
        state = optimizer.state.get(olayout.params[idx])
        if state is None:
            continue
        kind, shard, _, _ = layout.classify(name)
        out[layout.logical_name(name)] = (shard.offset if kind == GROUPED else -1, dict(state))
    return out


def optimizer_states() -> None:
    """Adam or Adafactor at ep=2 with a starved template expert: checkpoints (``checkpoint`` format) at steps 2
    and 4 and a save after fit, each rank's local optimizer state at those steps, then a resume from step 2."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_moe as lmoe

    steps = 4

    class Dump(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (REVIVE, steps):
                state = dump_local_optimizer_state(trainer.strategy, pl_module, trainer.optimizers[0])
                torch.save(state, out_dir() / f"local_step{trainer.global_step}_rank{trainer.global_rank}.pt")

    model = optimizer_model(PARAMS["optimizer"])
    ckpt = ModelCheckpoint(dirpath=out_dir(), filename="step{step}", every_n_train_steps=REVIVE, save_top_k=-1,
                           auto_insert_metric_name=False)
    strategy = lmoe.MoEStrategy(checkpoint=PARAMS.get("checkpoint", "full"))
    tr = trainer(max_steps=steps, strategy=strategy, callbacks=[starve_callback(), Dump(), ckpt],
                 enable_checkpointing=True)
    tr.fit(model)
    tr.save_checkpoint(out_dir() / "final.ckpt")
    save_state(tr, model, "uninterrupted")

    model = optimizer_model(PARAMS["optimizer"])
    strategy = lmoe.MoEStrategy(checkpoint=PARAMS.get("checkpoint", "full"))
    tr = trainer(max_steps=steps, strategy=strategy, callbacks=[starve_callback()])
    tr.fit(model, ckpt_path=out_dir() / f"step{REVIVE}.ckpt")
    save_state(tr, model, "resumed")
    write_result({"steps": tr.global_step}, rank=tr.global_rank)


# -- defect 5: LowRankExperts() under expert parallelism ------------------------------------------------------


@torch.no_grad()
def set_spectra(bank, ranks: list[int]) -> None:
    """Give expert e of a stacked bank ``ranks[e]`` equal singular values (energy=0.9 then needs them all)."""
    g = torch.Generator().manual_seed(5)
    for name in ("w1", "w2"):
        w = getattr(bank, name)
        for e, r in enumerate(ranks):
            u = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g)).Q
            v = torch.linalg.qr(torch.randn(w.shape[2], r, generator=g)).Q
            w[e] = u @ v.T


def low_rank() -> None:
    """LowRankExperts() with defaults before test at ep=2, rank 0's experts of rank 2, rank 1's of rank 3."""
    import copy

    from lightning_moe.callbacks import LowRankExperts
    from lightning_moe.compress import low_rank_experts

    from ep_models import Model, eval_loader

    model = Model()
    set_spectra(model.net.moe1.experts, [2, 2, 3, 3])
    reference = copy.deepcopy(model)
    low_rank_experts(reference)  # one process, every expert: the rank that keeps 90% of each expert's energy
    tr = trainer(callbacks=[LowRankExperts()])
    tr.test(model, dataloaders=eval_loader(tr.global_rank, tr.world_size), verbose=False)
    save_state(tr, model, "low_rank")
    save_state(tr, reference, "low_rank_reference")
    write_result({"ranks": model.net.moe1.experts.ranks, "reference_ranks": reference.net.moe1.experts.ranks,
                  "num_experts": model.net.moe1.experts.num_experts}, rank=tr.global_rank)


# -- defect 6: checkpoints after ExpertPruning under expert parallelism ----------------------------------------


def pruned_fit(epochs: int, name: str, ckpt_path: Path | None = None) -> dict:
    """TinyMoE (8 stacked experts, Adam) at ep=2, pruned to 4 at the end of epoch 0, a checkpoint every epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_moe as lmoe
    from lightning_moe.callbacks import ExpertPruning

    from helpers import RegressionData, TinyMoE

    torch.manual_seed(0)
    model = TinyMoE(num_experts=8, optimizer="adam", lr=0.01)
    pruning = ExpertPruning(keep=4, at_epoch=0)
    ckpt = ModelCheckpoint(dirpath=out_dir() / name, filename="epoch{epoch}", save_top_k=-1,
                           auto_insert_metric_name=False)
    tr = trainer(max_steps=-1, max_epochs=epochs, strategy=lmoe.MoEStrategy(checkpoint=PARAMS["checkpoint"]),
                 callbacks=[pruning, ckpt], enable_checkpointing=True)
    tr.fit(model, datamodule=RegressionData(n=32, offset=1.5), ckpt_path=ckpt_path)
    if PARAMS["checkpoint"] == "sharded":  # still sharded after fit: give the whole model back to compare
        from lightning_moe.distributed.expert_parallel import find_moe_layers, unshard_moe_layer

        for _, layer in find_moe_layers(model):
            unshard_moe_layer(layer)
    save_state(tr, model, name)
    return {"kept": pruning.kept, "num_experts": [layer.num_experts for layer in model.layers]}


def prune_resume() -> None:
    """Uninterrupted 3 epochs; then 3 epochs resumed from the checkpoint of epoch 1 into a fresh 8-expert model."""
    uninterrupted = pruned_fit(3, "uninterrupted")
    resumed = pruned_fit(3, "resumed", ckpt_path=out_dir() / "uninterrupted" / "epoch1.ckpt")
    import torch.distributed as dist

    write_result({"uninterrupted": uninterrupted, "resumed": resumed}, rank=dist.get_rank())


# -- defect 7: ExpertMagnitudePruning + ExpertPruning ---------------------------------------------------------


def magnitude_and_expert_pruning() -> None:
    """Magnitude pruning (w1 -> w1_orig + w1_mask) and expert pruning (8 -> 4, re-wraps DDP) at the end of epoch 0;
    at the start of epoch 1 each rank reports what DDP ignores and the experts it holds."""
    import lightning.pytorch as L

    from lightning_moe.callbacks import ExpertMagnitudePruning, ExpertPruning
    from lightning_moe.distributed.expert_parallel import expert_state_names

    from helpers import RegressionData, TinyMoE

    report: dict = {}

    class Inspect(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch != 1:
                return
            ddp = trainer.strategy.model
            ignored = set(getattr(ddp, "parameters_to_ignore", ()))
            names = expert_state_names(pl_module)
            report.update(
                rewrapped=ddp is not self.first_ddp,
                missing=sorted(set(names) - ignored),
                masked=sorted(n for n in names if n.endswith(("_orig", "_mask"))),
                ddp_experts=sorted(n for n, p in pl_module.named_parameters() if ".experts." in n and n not in ignored),
                local_w1=pl_module.layers[0].experts.w1_orig.detach().sum().item(),
            )

        def on_train_start(self, trainer, pl_module):
            self.first_ddp = trainer.strategy.model

    torch.manual_seed(0)
    model = TinyMoE(num_experts=8)
    tr = trainer(max_steps=-1, max_epochs=2, callbacks=[ExpertMagnitudePruning(amount=0.5),
                                                        ExpertPruning(keep=4, at_epoch=0), Inspect()])
    tr.fit(model, datamodule=RegressionData(n=32, offset=1.5, seed=tr.global_rank))  # each rank its own data
    write_result(report, rank=tr.global_rank)


# -- defect 8: smaller ones -------------------------------------------------------------------------------------


class Tag:
    """A hyperparameter torch.load(weights_only=True) refuses to unpickle (not an allow-listed type)."""

    def __init__(self, name: str) -> None:
        self.name = name


def smaller() -> None:
    """At ep=2: clip_grad_norm_ by hand (warned once); resume a checkpoint that needs weights_only=False, in both
    formats; predict with 3 batches on rank 0 and 2 on rank 1 (a clear error before the first batch)."""
    import warnings

    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_moe as lmoe

    from ep_models import Model, make_data

    result: dict = {}
    rank = int(__import__("os").environ.get("LOCAL_RANK", 0))

    class HandClip(Model):
        def on_before_optimizer_step(self, optimizer):
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3).fit(HandClip())
    result["hand_clip_warnings"] = [str(w.message) for w in caught if "clip_grad_norm_" in str(w.message)]
    write_result(result, rank=rank)

    class Tagged(Model):
        def __init__(self, tag: Tag | None = None, **kwargs) -> None:
            super().__init__(**kwargs)
            self.save_hyperparameters()

    for fmt in ("full", "sharded"):
        ckpt = L.callbacks.ModelCheckpoint(dirpath=out_dir() / fmt, filename="last", save_top_k=-1)
        strategy = lmoe.MoEStrategy(checkpoint=fmt)
        trainer(max_steps=2, strategy=strategy, callbacks=[ckpt], enable_checkpointing=True).fit(Tagged(Tag("x")))
        tr = trainer(max_steps=3, strategy=lmoe.MoEStrategy(checkpoint=fmt))
        try:
            tr.fit(Tagged(Tag("x")), ckpt_path=out_dir() / fmt / "last.ckpt", weights_only=False)
            result[f"resumed_{fmt}"] = tr.global_step
        except Exception as err:  # noqa: BLE001 (reported to the test)
            result[f"resumed_{fmt}"] = f"{type(err).__name__}: {err}"[:300]
        write_result(result, rank=rank)

    x, y = make_data(3)
    per_rank = 3 - rank  # rank 0: 3 batches, rank 1: 2
    loader = DataLoader(TensorDataset(x[: 4 * per_rank], y[: 4 * per_rank]), batch_size=4)
    try:
        trainer().predict(Model(), dataloaders=loader)
        result["predict"] = "no error"
    except ValueError as err:
        result["predict"] = str(err)
    write_result(result, rank=rank)


# -- defect 9: activation checkpointing -----------------------------------------------------------------------


def checkpointed_model(mode: bool | None, **moe):
    """Linear -> 2 residual MoE blocks, each under torch.utils.checkpoint (use_reentrant=mode; None: no checkpoint)
    -> head, with aux and z losses, bias balancing, and an ExpertLoad metric updated every step."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    import lightning_moe as lmoe
    from lightning_moe.metrics import ExpertLoad

    class Checkpointed(lmoe.MoELightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(8, 8)
            kwargs = dict(top_k=2, hidden_dim=16, aux_loss_coef=0.1, z_loss_coef=0.01, bias_update_rate=0.05, **moe)
            self.blocks = nn.ModuleList([lmoe.MoE(8, 4, **kwargs) for _ in range(2)])
            self.head = nn.Linear(8, 1)
            self.load = ExpertLoad(num_experts=4)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            for block in self.blocks:
                if mode is None:
                    h = h + block(h)
                else:
                    h = h + checkpoint(block, h, use_reentrant=mode)
            return self.head(h).squeeze(-1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.load.update(self.blocks[0])
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Checkpointed()


def checkpointing() -> None:
    """ep=2, accumulate_grad_batches=2, 3 steps, each rank its own data: without checkpointing, then under
    torch.utils.checkpoint non-reentrant and reentrant; weights (expert biases included) and pruning counts."""
    from lightning_moe.callbacks import ExpertPruning

    from helpers import RegressionData

    result: dict = {}
    for name, mode in (("none", None), ("non_reentrant", False), ("reentrant", True)):
        model, pruning = checkpointed_model(mode), ExpertPruning(keep=2, at_epoch=9)
        tr = trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[pruning], reload_dataloaders_every_n_epochs=0)
        tr.fit(model, datamodule=RegressionData(n=48, offset=1.5, seed=tr.global_rank))
        save_state(tr, model, f"ckpt_{name}")
        result[name] = {k: v.tolist() for k, v in pruning.counts.items()}
    write_result(result, rank=tr.global_rank)


SCENARIOS = {"manual": manual, "save_after_stages": save_after_stages, "optimizer_states": optimizer_states,
             "low_rank": low_rank, "prune_resume": prune_resume,
             "magnitude_and_expert_pruning": magnitude_and_expert_pruning, "smaller": smaller,
             "checkpointing": checkpointing}


def body() -> None:
    PARAMS.update(json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    SCENARIOS[sys.argv[1]]()


if __name__ == "__main__":
    main(body)
