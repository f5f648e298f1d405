"""MoEStrategy(data_parallel="fsdp") runs for tests/test_fsdp.py: ``python fsdp_train.py <suite> '<json params>'``.

Lightning's popen launcher starts the other ranks (the same command line). Each rank writes ``rank{r}.json``;
checkpoints (DCP directories) go to ``$LMOE_TEST_OUT``.

Suites:
    fit: train ``AdamWModel`` (params: devices, ep, steps, accumulate, clip, precision, resume, every, save);
    init: build ``MetaTransformer`` on meta, materialise (fit with max_steps=0), save (params: data_parallel);
    stages: fit, then validate, test and predict with new trainers; the model stays sharded throughout;
    memory: bytes each rank holds (params, grads, AdamW states: sum of local shards) and the peak RSS growth of a
        training step of the package transformer (params: devices, ep, arch, micro_batch, seq_len);
    zero_tokens: bf16-mixed, every token routed to expert 0: the rank holding expert 1 gets no row.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

import lightning_moe as lmoe
from lightning_moe.distributed.expert_parallel import expert_parameters
from lightning_moe.distributed.fsdp import is_dtensor
from lightning_moe.memory import mmap_large_allocations, peak_rss_bytes, reset_peak_rss, rss_bytes
from lightning_moe.plan import Architecture

from ep_models import eval_loader
from fsdp_models import AdamWModel, MetaTransformer
from script_io import main, out_dir, write_result

torch.set_num_threads(1)


def trainer(params: dict, **kwargs) -> L.Trainer:
    strategy = lmoe.MoEStrategy(expert_parallel_size=params.get("ep"),
                                data_parallel=params.get("data_parallel", "fsdp"))
    return L.Trainer(accelerator="cpu", devices=params.get("devices", 2), strategy=strategy,
                     use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, reload_dataloaders_every_n_epochs=1, **kwargs)


def local_numel(params) -> int:
    return sum((p.to_local() if is_dtensor(p) else p).numel() for p in params)


def fit(params: dict) -> None:
    steps, acc = params.get("steps", 5), params.get("accumulate", 1)
    model = AdamWModel(lr=0.01, steps=steps, accumulate=acc, aux_losses=params.get("aux_losses", False))
    callbacks: list = [lmoe.callbacks.RouterPrecision()] if params.get("router_precision") else []
    if params.get("every"):
        callbacks.append(ModelCheckpoint(dirpath=out_dir(), filename="step{step}", every_n_train_steps=params["every"],
                                         save_top_k=-1))
    tr = trainer(params, max_steps=steps, accumulate_grad_batches=acc, gradient_clip_val=params.get("clip"),
                 precision=params.get("precision", "32-true"), callbacks=callbacks,
                 enable_checkpointing=bool(params.get("every")))
    tr.fit(model, ckpt_path=params.get("resume"))
    tr.save_checkpoint(out_dir() / params.get("save", "final"))
    experts = expert_parameters(model)
    write_result({
        "global_step": tr.global_step,
        "all_sharded": all(is_dtensor(p) for p in model.parameters()),
        "expert_local_numel": local_numel(experts),
        "dense_local_numel": local_numel(p for p in model.parameters() if all(p is not q for q in experts)),
        "logical_numel": sum(p.numel() for p in model.parameters()),
        "router_dtypes": sorted({str(p.dtype) for layer in (model.net.moe1, model.net.moe2)
                                 for p in layer.router.parameters()}),
        "expert_dtypes": sorted({str(p.dtype) for p in experts}),
        "finite": all(bool((p.to_local() if is_dtensor(p) else p).isfinite().all()) for p in model.parameters()),
    }, rank=tr.global_rank)


def init(params: dict) -> None:
    L.seed_everything(params.get("seed", 5))
    model = MetaTransformer(meta=True)
    broadcasts = []
    broadcast = lmoe.MoEStrategy._broadcast
    lmoe.MoEStrategy._broadcast = lambda self, module: (broadcasts.append(1), broadcast(self, module))[1]
    tr = trainer(params, max_steps=0)
    tr.fit(model, train_dataloaders=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.zeros(2, 5, dtype=torch.long)), batch_size=1))
    tr.save_checkpoint(out_dir() / params.get("save", "init"))
    write_result({"meta_left": any(p.is_meta for p in model.parameters()), "broadcasts": len(broadcasts)},
                 rank=tr.global_rank)


def stages(params: dict) -> None:
    model = AdamWModel(lr=0.01)
    tr = trainer(params, max_steps=5)
    tr.fit(model)
    rank, world = tr.global_rank, tr.world_size
    shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    result = {"after_fit": all(is_dtensor(p) for p in model.parameters())}
    result["val_loss"] = trainer(params).validate(model, eval_loader(rank, world), verbose=False)[0]["val_loss"]
    result["test_loss"] = trainer(params).test(model, eval_loader(rank, world), verbose=False)[0]["test_loss"]
    predictions = trainer(params).predict(model, eval_loader(rank, world))
    result["predictions"] = torch.cat(predictions).flatten().tolist()
    result["still_sharded"] = all(is_dtensor(p) and tuple(p.to_local().shape) == shapes[n]
                                  for n, p in model.named_parameters())
    write_result(result, rank=rank)


class MemoryProbe(Callback):
    """Local shard bytes (params, grads, optimizer states) after the first step, and the peak of the second:
    those bytes plus the growth of RSS over the step (framework memory that stays between steps, imports, gloo
    buffers, is not the step's, and not the planner's)."""

    def __init__(self) -> None:
        self.result: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.result["grad_bytes"] = local_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            self.start = rss_bytes()
            reset_peak_rss()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:  # after the first optimizer step
            self.result["param_bytes"] = local_bytes(pl_module.parameters())
            states = [v for st in trainer.optimizers[0].state.values() for v in st.values() if isinstance(v, Tensor)]
            self.result["optimizer_bytes"] = local_bytes(states)
        if trainer.global_step == 2:
            held = sum(self.result[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))
            self.result["peak_bytes"] = held + peak_rss_bytes() - self.start


def local_bytes(tensors) -> int:
    return sum((t.to_local() if is_dtensor(t) else t).nbytes for t in tensors)


class KeptGradients(MetaTransformer):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated between steps, as the planner counts


def memory(params: dict) -> None:
    mmap_large_allocations()  # RSS follows live memory
    L.seed_everything(0)
    b, s = params["micro_batch"], params["seq_len"]
    arch = Architecture(**params["arch"])
    tokens = torch.randint(arch.vocab, (2 * b, s + 1), generator=torch.Generator().manual_seed(0))
    probe = MemoryProbe()
    tr = trainer(params, max_steps=2, callbacks=[probe])
    tr.fit(KeptGradients(arch), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=b))
    write_result(probe.result, rank=tr.global_rank)


def zero_tokens(params: dict) -> None:
    model = AdamWModel(lr=0.01)
    with torch.no_grad():
        for layer in (model.net.moe1, model.net.moe2):
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[0] = 1.0  # logits [s, s/2, 0, 0], s the sum of the (positive) input:
            layer.router.gate.weight[1] = 0.5  # top-2 = experts 0 and 1, both on EP rank 0
    bias_inputs = model.net.inp
    with torch.no_grad():
        bias_inputs.weight.zero_()
        bias_inputs.bias.fill_(3.0)  # every token's hidden state is tanh(3) > 0: expert 0 wins everywhere
    tr = trainer(params, max_steps=2, precision="bf16-mixed")
    tr.fit(model)
    counts = [layer.tokens_per_expert.tolist() for layer in (model.net.moe1, model.net.moe2)]
    write_result({"global_step": tr.global_step, "counts": counts}, rank=tr.global_rank)


if __name__ == "__main__":
    suites = {"fit": fit, "init": init, "stages": stages, "memory": memory, "zero_tokens": zero_tokens}
    main(lambda: suites[sys.argv[1]](json.loads(sys.argv[2])))
