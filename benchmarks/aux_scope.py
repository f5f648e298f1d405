"""Training-step time of the global loss scope against the local one, on 2 gloo ranks, as a ratio in one run.

The global scope (``MoE(aux_loss_scope="global")``, the default) sums each layer's routing counts over the ranks
with one asynchronous all-reduce per layer forward (started before the dispatch, waited for after it); the local
scope does no collective. This measures what that costs in a whole training step.

Set-up: the script starts 2 CPU processes itself (gloo, one thread each). Each builds the same small decoder
(``lightning_moe.models.Transformer``: 4 blocks, width 128, 8 SwiGLU experts of width 256, top-2, vocabulary 256)
twice, once per scope, shards the experts over both ranks (expert parallelism 2, as ``MoEStrategy`` does), installs
the count reduction, wraps dense weights in DDP and trains with AdamW: forward, cross-entropy + aux losses,
backward, expert-gradient reduction, step. Blocks of steps of the two models alternate (ABBA order) so that load
from other processes on the machine hits both alike; the table gives medians of per-step times on rank 0.

Usage: ``python benchmarks/aux_scope.py [--repeats 8] [--steps 5] [--batch 8] [--seq 128] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lightning_moe import _compat
from lightning_moe.architecture import Architecture
from lightning_moe.distributed import gradients
from lightning_moe.distributed.count_reduction import install_count_reduction
from lightning_moe.distributed.expert_parallel import expert_parameters, expert_state_names, shard_moe_layer
from lightning_moe.models.transformer import Transformer
from lightning_moe.nn.moe import find_moe_layers

ARCH = Architecture(layers=4, dim=128, heads=4, vocab=256, expert_hidden=256, experts=8, top_k=2, name="bench")
SCOPES = ("local", "global")
WORLD = 2


def build(scope: str, rank: int) -> tuple[DistributedDataParallel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(ARCH, moe_kwargs={"aux_loss_scope": scope})
    for path, layer in find_moe_layers(model):
        shard_moe_layer(layer, path, rank, WORLD, dist.group.WORLD)
    install_count_reduction(model)
    _compat.set_ddp_ignored_names(model, expert_state_names(model))
    ddp = DistributedDataParallel(model)
    return ddp, torch.optim.AdamW(model.parameters(), lr=1e-3)


def step(ddp: DistributedDataParallel, opt: torch.optim.Optimizer, tokens_BS: torch.Tensor,
         data_group: dist.ProcessGroup) -> None:
    """One training step as MoEStrategy runs it (DDP for dense weights, expert gradients reduced after backward)."""
    opt.zero_grad(set_to_none=True)
    logits_BSV = ddp(tokens_BS[:, :-1])
    loss = F.cross_entropy(logits_BSV.flatten(0, 1), tokens_BS[:, 1:].flatten()) + ddp.module.aux_loss()
    loss.backward()
    params = [p for p in expert_parameters(ddp.module) if p.requires_grad]
    gradients.reduce_expert_gradients(params, data_group, WORLD, torch.device("cpu"))
    opt.step()


def worker(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    # Expert parallelism over every rank: the ranks holding the same experts (the "data" dim of a (1, 2) mesh)
    # are this rank alone. Every rank creates every group, in the same order.
    data_group = [dist.new_group([r]) for r in range(WORLD)][rank]
    models = {scope: build(scope, rank) for scope in SCOPES}
    g = torch.Generator().manual_seed(rank)
    tokens_BS = torch.randint(ARCH.vocab, (args.batch, args.seq + 1), generator=g)
    for scope in SCOPES:  # warm-up
        for _ in range(2):
            step(*models[scope], tokens_BS, data_group)
    times: dict[str, list[float]] = {scope: [] for scope in SCOPES}
    for rep in range(args.repeats):
        order = SCOPES if rep % 2 == 0 else SCOPES[::-1]
        for scope in order:
            dist.barrier()
            for _ in range(args.steps):
                start = time.perf_counter()
                step(*models[scope], tokens_BS, data_group)
                times[scope].append(time.perf_counter() - start)
    if rank == 0:
        results.update({scope: statistics.median(t) for scope, t in times.items()})
        results["samples"] = len(times["global"])
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="blocks per scope (alternating order)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--json", type=str, default=None, help="also write the result to this file")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(port, args, results), nprocs=WORLD, join=True)
        results = dict(results)
    ratio = results["global"] / results["local"]
    tokens = args.batch * args.seq
    print(f"2 gloo ranks, expert parallel 2, {ARCH.layers} MoE layers x {ARCH.experts} experts (top-{ARCH.top_k}), "
          f"{tokens} tokens per rank, median of {results['samples']} steps per scope")
    print(f"{'scope':<8} {'step ms':>9}")
    for scope in SCOPES:
        print(f"{scope:<8} {results[scope] * 1e3:9.2f}")
    print(f"global / local = {ratio:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**results, "ratio": ratio, "tokens_per_rank": tokens}, f, indent=2)


if __name__ == "__main__":
    main()
