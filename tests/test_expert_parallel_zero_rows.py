"""Expert parallelism when ranks hold nothing: zero received rows, zero tokens of their own.

Every rank must take part in every exchange, forward and backward, whatever it holds, and the rows
it sends back must have a dtype every rank agrees on. Before the fix, a rank whose experts received
no row returned rows that did not depend on the received ones: autograd skipped that all-to-all's
backward there while its peers entered it (gloo aborts, NCCL hangs), and under bf16 autocast ranks
that ran experts sent bf16 rows back while the empty rank sent float32.

Each world size runs once in ``torch.multiprocessing.spawn`` gloo processes with a short collective
timeout (a hang fails instead of blocking the suite). Every rank compares its sharded layer against
the same layer run whole in one process on every rank's tokens (outputs, input gradients, expert
and router gradients); rank 0 writes the worst difference of each case to a JSON file as it goes.

Shape legend: T tokens, D model width, E experts.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_moe as lmoe
from lightning_moe.distributed import shard_moe_layer

DIM = 8
# all_to_expert_0: every rank's tokens go to expert 0, so every other rank receives zero rows.
# rank_without_tokens: the last rank has no token of its own (routing as the router decides; a shared expert).
# rank_all_padding: the last rank's tokens are all padding and the others' go to expert 0: it sends
# and receives nothing at all.
CASES = ("all_to_expert_0", "rank_without_tokens", "rank_all_padding")
FORCED = ("all_to_expert_0", "rank_all_padding")
PRECISIONS = ("fp32", "bf16")
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}  # relative: bf16 sums of different row groups round differently


def _inputs(case: str, rank_count: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Per-rank tokens ``x_TD`` and padding masks ``[T]`` of a case (the same on every rank)."""
    g = torch.Generator().manual_seed(7)
    sizes = [3 + r for r in range(rank_count)]
    if case == "rank_without_tokens":
        sizes[-1] = 0
    xs = [torch.randn(n, DIM, generator=g) for n in sizes]
    masks: list[torch.Tensor | None] = [None] * rank_count
    if case in FORCED:
        xs = [x.abs() + 0.5 for x in xs]  # positive inputs: the gate below prefers expert 0 for every token
    if case == "rank_all_padding":
        masks = [torch.zeros(n, dtype=torch.bool) for n in sizes]
        masks[-1] = torch.ones(sizes[-1], dtype=torch.bool)
        masks[0][1] = True
    return xs, masks


def _layer(case: str, num_experts: int) -> lmoe.MoE:
    torch.manual_seed(0)
    # A shared expert on the rank without tokens: its (empty) output must have the routed output's dtype too.
    shared = 1 if case == "rank_without_tokens" else 0
    layer = lmoe.MoE(DIM, num_experts, top_k=1, hidden_dim=12, aux_loss_coef=1e-2, z_loss_coef=1e-3,
                     num_shared_experts=shared)
    if case in FORCED:
        with torch.no_grad():
            gate = layer.router.gate.weight  # [E, D]
            gate.copy_(torch.full_like(gate, -0.1))
            gate[0] = 0.1  # logit 0 > 0 > every other logit for positive inputs
    return layer


def _loss(y: torch.Tensor, layer: lmoe.MoE, rank: int) -> torch.Tensor:
    return y.float().square().sum() * (rank + 1) + layer.aux_loss


def _run_case(rank: int, world: int, case: str, precision: str) -> dict[str, float]:
    layer = _layer(case, num_experts=world)  # one expert per rank: every expert but 0 may get no row
    reference = copy.deepcopy(layer)
    xs, masks = _inputs(case, world)
    shard_moe_layer(layer, "", rank, world, dist.group.WORLD)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())

    x = xs[rank].clone().requires_grad_()
    with autocast:
        y = layer(x, padding_mask=masks[rank])
    _loss(y, layer, rank).backward()

    x_ref = [t.clone().requires_grad_() for t in xs]
    y_ref, loss_ref = [], 0.0
    for r, (t, m) in enumerate(zip(x_ref, masks, strict=True)):
        with autocast:
            y_ref.append(reference(t, padding_mask=m))
        loss_ref = loss_ref + _loss(y_ref[-1], reference, r)  # aux_loss is the last forward's: read it now
    loss_ref.backward()

    expected_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    expert_diff = max(
        _relative(p.grad, getattr(reference.experts, name).grad[rank:rank + 1])
        for name, p in layer.experts.named_parameters()
    )
    # The router is replicated: its gradient on one rank covers that rank's tokens; summed, every token.
    router_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    return {
        "forward": _relative(y.float(), y_ref[rank].float()),
        "shape": float(y.shape != y_ref[rank].shape),
        "dtype": float(y.dtype != expected_dtype),
        "input_grad": _relative(x.grad, x_ref[rank].grad),
        "expert_grad": expert_diff,
        "router_grad": _relative(router_grad, reference.router.gate.weight.grad),
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude (at least 1); 0 for empty tensors."""
    if b.numel() == 0:
        return float(a.numel() != 0)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1)).item()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # A short timeout turns a rank left waiting in an exchange into an error instead of a hung suite.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, float] = {}
    for case in CASES:
        for precision in PRECISIONS:
            for key, value in _run_case(rank, world, case, precision).items():
                worst = torch.tensor([value])
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                results[f"{case}/{precision}/{key}"] = worst.item()
            if rank == 0:
                with open(out, "w") as f:
                    json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"ep{w}")
def zero_row_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"zero_rows_{world}") / "results.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = None
    try:
        mp.spawn(_worker, args=(world, port, str(out)), nprocs=world)
    except Exception as err:  # a rank that aborted or timed out: the cases it reached are reported
        error = f"{type(err).__name__}: {str(err)[-2000:]}"
    results = json.loads(out.read_text()) if out.exists() else {}
    return results, error


@pytest.mark.distributed
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", CASES)
def test_zero_rows_match_single_process(zero_row_results, case, precision):
    results, error = zero_row_results
    if f"{case}/{precision}/forward" not in results:
        pytest.fail(f"{case}/{precision} did not complete on every rank: {error}")
    tol = TOLERANCE[precision]
    assert results[f"{case}/{precision}/shape"] == 0
    assert results[f"{case}/{precision}/dtype"] == 0
    for key in ("forward", "input_grad", "expert_grad", "router_grad"):
        assert results[f"{case}/{precision}/{key}"] < tol, key
