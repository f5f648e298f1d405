"""The overlapped expert-parallel exchange against the sequential one, on 2 gloo ranks: values and gradients.

``ExpertParallelDispatcher(overlap=True)`` (the default for stacked experts) computes a rank's own rows while
the all-to-alls travel and runs the received rows source by source; ``overlap=False`` runs the sequence of
``ShardedDispatcher`` (exchange, regroup by expert, experts, exchange back). Both must give the same outputs,
input gradients and expert/router gradients, for each activation, with biases, capacity drops, padding and
frozen experts. No timing here (``benchmarks/ep_overlap.py`` measures it).

Shape legend: T tokens, D model width.
"""

from __future__ import annotations

import datetime
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_moe as lmoe
from lightning_moe.distributed import ExpertParallelDispatcher, shard_moe_layer

DIM = 8
CASES = {
    "gelu": dict(),
    "swiglu_bias": dict(activation="swiglu", bias=True),
    "relu_capacity": dict(activation="relu", capacity_factor=0.5),
    "silu_padded": dict(activation="silu"),
    "frozen_experts": dict(),
}


def _run_case(rank: int, name: str) -> float:
    results = []
    for overlap in (True, False):
        torch.manual_seed(0)
        layer = lmoe.MoE(DIM, 4, top_k=2, hidden_dim=12, **CASES[name])
        shard = shard_moe_layer(layer, "", rank, 2, dist.group.WORLD)
        layer.expert_dispatcher = ExpertParallelDispatcher(shard, dist.group.WORLD, overlap=overlap)
        assert layer.experts.fused_params(torch.zeros(1, DIM)) is not None  # overlap=True takes the overlapped path
        if name == "frozen_experts":
            layer.experts.requires_grad_(False)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(5 + 3 * rank, DIM, generator=g).requires_grad_()
        mask = torch.rand(x.shape[0], generator=g) < 0.3 if name == "silu_padded" else None
        y = layer(x, padding_mask=mask)
        (y.square().sum() * (rank + 1) + layer.aux_loss).backward()
        grads = [p.grad if p.grad is not None else torch.zeros(0) for p in layer.parameters()]
        results.append([y.detach(), x.grad, *grads])
    return max((a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(*results, strict=True))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name in CASES:
        worst = torch.tensor([_run_case(rank, name)])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        results[name] = worst.item()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_overlapped_exchange_matches_the_sequential_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "results.json"
    mp.start_processes(_worker, args=(port, str(out)), nprocs=2, start_method="spawn")
    results = json.loads(out.read_text())
    assert results.keys() == CASES.keys()
    assert all(diff < 1e-5 for diff in results.values()), results
