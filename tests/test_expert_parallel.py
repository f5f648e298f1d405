"""Expert parallelism units: the EP dispatcher, all-to-all, sharding and the logical checkpoint layout.

Collective checks run once in 2 gloo processes (``torch.multiprocessing.spawn``); each rank
compares the sharded layer against the same layer run whole on the concatenated batch (the
reference path), and rank 0 writes the worst differences to a JSON file the tests read.
"""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lightning_moe as lmoe
from lightning_moe.distributed import all_to_all, all_to_all_counts, shard_moe_layer, unshard_moe_layer
from lightning_moe.distributed.expert_parallel import (
    check_expert_parallel_size,
    expert_major_order,
    expert_parameters,
    expert_shard,
    expert_state_names,
)
from lightning_moe.distributed.shard_layout import (
    OptimizerLayout,
    ShardLayout,
    local_model_state,
    local_optimizer_state,
)
from lightning_moe.strategy import MoEStrategy, launcher_gone

WORLD = 2
CASES = {
    "grouped": dict(),
    "template": dict(expert="mlp"),
    "swiglu_bias_shared": dict(activation="swiglu", bias=True, num_shared_experts=1),
    "capacity": dict(capacity_factor=0.5),
    "expert_choice": dict(router="expert_choice"),
    "top1_sigmoid": dict(top_k=1, score_func="sigmoid"),
}


def _layer(case: str) -> lmoe.MoE:
    kwargs = dict(CASES[case])
    if kwargs.get("expert") == "mlp":
        kwargs["expert"] = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    kwargs.setdefault("top_k", 2)
    return lmoe.MoE(8, 4, hidden_dim=12, aux_loss_coef=0.0, z_loss_coef=0.0, **kwargs)


def _grad_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    # An expert that got no token has no gradient, sharded or not.
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return (a - b).abs().max().item()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.group.WORLD
    results: dict[str, float] = {}

    def worst(name: str, value: float) -> None:
        t = torch.tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        results[name] = t.item()

    # all_to_all: uneven splits (rank r sends r + 1 + s rows to rank s), and its backward.
    sends = [rank + 1 + s for s in range(WORLD)]
    recvs = [s + 1 + rank for s in range(WORLD)]
    x = torch.arange(sum(sends) * 3, dtype=torch.float32).reshape(-1, 3).add(100 * rank).requires_grad_()
    y = all_to_all(x, recvs, sends, group)
    expected = torch.cat([
        torch.arange(sum(s + 1 + d for d in range(WORLD)) * 3, dtype=torch.float32).reshape(-1, 3).add(100 * s)[
            sum(s + 1 + d for d in range(rank)):sum(s + 1 + d for d in range(rank + 1))]
        for s in range(WORLD)
    ])
    worst("a2a_value", (y - expected).abs().max().item())
    (y * (rank + 1)).sum().backward()  # d/dx: the factor of the rank each row went to
    expected_grad = torch.cat([torch.full((n, 3), s + 1.0) for s, n in enumerate(sends)])
    worst("a2a_grad", (x.grad - expected_grad).abs().max().item())
    counts = all_to_all_counts(torch.tensor([10 * rank + j for j in range(2 * WORLD)]), group)
    worst("a2a_counts", (counts - torch.tensor([10 * s + 2 * rank + j for s in range(WORLD) for j in range(2)])).abs()
          .max().item())

    # The EP dispatcher against the whole layer on the concatenated batch (rank r holds 3 + 4r tokens;
    # the 1-token batch leaves experts without rows).
    for case in CASES:
        for sizes in ([3, 7], [1, 2]):
            torch.manual_seed(0)
            layer = _layer(case)
            reference = copy.deepcopy(layer)
            xs = [torch.randn(n, 8, generator=torch.Generator().manual_seed(10 + i)) for i, n in enumerate(sizes)]
            shard_moe_layer(layer, "", rank, WORLD, group)
            x = xs[rank].clone().requires_grad_()
            y = layer(x)
            (y.square().sum() * (rank + 1)).backward()
            x_ref = [t.clone().requires_grad_() for t in xs]
            y_ref = [reference(t) for t in x_ref]
            sum(t.square().sum() * (r + 1) for r, t in enumerate(y_ref)).backward()
            diff = max((y - y_ref[rank]).abs().max().item(), (x.grad - x_ref[rank].grad).abs().max().item())
            # A rank's expert gradient sums every rank's contribution (the all-to-all's backward).
            lo = rank * 2
            if isinstance(layer.experts, lmoe.GroupedExperts):
                pairs = [(p.grad, getattr(reference.experts, n).grad[lo:lo + 2])
                         for n, p in layer.experts.named_parameters()]
            else:
                pairs = [(p.grad, q.grad) for i in range(2) for p, q in zip(
                    layer.experts.experts[i].parameters(), reference.experts.experts[lo + i].parameters(), strict=True)]
            grad_diff = max(_grad_diff(a, b) for a, b in pairs)
            worst(f"{case}/{sizes[0]}/forward", diff)
            worst(f"{case}/{sizes[0]}/expert_grad", grad_diff)
            held = sum(p.numel() for p in layer.experts.parameters())
            worst(f"{case}/{sizes[0]}/held_fraction", held / sum(p.numel() for p in reference.experts.parameters()))
            unshard_moe_layer(layer)
            worst(f"{case}/{sizes[0]}/unshard", max(
                (p - q).abs().max().item() for p, q in zip(layer.parameters(), reference.parameters(), strict=True)))
            worst(f"{case}/{sizes[0]}/dispatcher_removed", float(layer.expert_dispatcher is not None))
    # With a GradScaler, a non-finite expert gradient on one rank must reach every rank's step decision.
    strategy = MoEStrategy(parallel_devices=[torch.device("cpu")] * WORLD)
    param = nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([1.0, float("inf") if rank == 1 else 2.0, 3.0])
    strategy._agree_on_nonfinite([param])
    # rank 0 (finite itself) reports whether it sees non-finite gradients now; rank 1 reports 0.
    worst("nonfinite_everywhere", float(not bool(torch.isfinite(param.grad).all())) if rank == 0 else 0.0)

    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def collective_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "results.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD)
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_all_to_all_uneven_splits_values_and_gradients(collective_results):
    assert collective_results["a2a_value"] == 0
    assert collective_results["a2a_grad"] == 0
    assert collective_results["a2a_counts"] == 0


@pytest.mark.distributed
def test_nonfinite_expert_gradients_are_seen_by_every_rank(collective_results):
    assert collective_results["nonfinite_everywhere"] == 1.0


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_dispatcher_matches_whole_layer(collective_results, case):
    for size in (3, 1):
        assert collective_results[f"{case}/{size}/forward"] < 1e-5
        assert collective_results[f"{case}/{size}/expert_grad"] < 1e-5
        assert collective_results[f"{case}/{size}/held_fraction"] == 0.5
        assert collective_results[f"{case}/{size}/unshard"] == 0
        assert collective_results[f"{case}/{size}/dispatcher_removed"] == 0


def test_expert_major_order_matches_loop():
    counts_PL = torch.tensor([[2, 0, 1], [1, 3, 0], [0, 1, 2]])
    order = expert_major_order(counts_PL, int(counts_PL.sum()))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts_PL.reshape(-1).cumsum(0)[:-1]]).view(3, 3)
    expected = [int(starts[s, e]) + i for e in range(3) for s in range(3) for i in range(int(counts_PL[s, e]))]
    assert order.tolist() == expected


def test_check_sizes_name_the_layer_and_the_fix():
    layers = [("block.0.moe", lmoe.MoE(8, 6)), ("block.1.moe", lmoe.MoE(8, 4))]
    with pytest.raises(ValueError, match="expert_parallel_size=3 must divide the world size 4"):
        check_expert_parallel_size(layers, 3, 4, "MoEStrategy")
    with pytest.raises(ValueError, match=r"'block.1.moe' has num_experts=4.*expert_parallel_size=3"):
        check_expert_parallel_size(layers, 3, 6, "MoEStrategy")
    check_expert_parallel_size(layers, 2, 4, "MoEStrategy")


@pytest.mark.parametrize("kwargs, match", [
    (dict(expert_parallel_size=0), "expert_parallel_size=0 must be a positive int"),
    (dict(expert_parallel_size=1.5), "expert_parallel_size=1.5"),
    (dict(checkpoint="zip"), "checkpoint='zip' must be one of"),
    (dict(checkpoint="sharded", start_method="spawn"), "checkpoint='sharded'.*start_method='spawn'"),
])
def test_strategy_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEStrategy(**kwargs)


def test_registered_names_resolve_to_the_strategy():
    import lightning.pytorch as L
    from lightning.pytorch.strategies import StrategyRegistry

    assert "moe" in StrategyRegistry and "moe_spawn" in StrategyRegistry
    MoEStrategy.register_strategies(StrategyRegistry)  # importing twice must not fail
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="moe", logger=False)
    assert isinstance(trainer.strategy, MoEStrategy) and trainer.strategy._start_method == "popen"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="moe_spawn", logger=False)
    assert isinstance(trainer.strategy, MoEStrategy) and trainer.strategy._start_method == "spawn"


def test_launcher_gone():
    import os

    assert not launcher_gone(None)
    assert not launcher_gone(os.getppid())
    assert launcher_gone(os.getppid() + 1_000_000)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 8)
        self.grouped = lmoe.MoE(8, 4, hidden_dim=12, bias=True)
        self.template = lmoe.MoE(8, 4, expert=nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8)))


def _shard_locally(model: nn.Module, ep_rank: int) -> ShardLayout:
    # Sharding needs no collective without a broadcast; the dispatcher is never called here.
    return ShardLayout([shard_moe_layer(m, n, ep_rank, 2, None) for n, m in model.named_modules()
                        if isinstance(m, lmoe.MoE)])


def test_ddp_ignores_experts_and_routing_stats_only():
    names = set(expert_state_names(_TwoLayers()))
    assert "grouped.experts.w1" in names and "template.experts.experts.3.2.bias" in names
    assert "grouped.tokens_per_expert" in names and "template.router_entropy" in names
    assert not any("router.gate" in n or "expert_bias" in n or n.startswith("inp") for n in names)


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_logical_checkpoint_layout_slices_model_and_optimizer_state(ep_rank):
    whole = _TwoLayers()
    opt = torch.optim.Adam([{"params": [p for n, p in whole.named_parameters() if "experts" in n], "lr": 0.1},
                            {"params": [p for n, p in whole.named_parameters() if "experts" not in n]}])
    sum(p.square().sum() for p in whole.parameters()).backward()
    opt.step()
    full_state = whole.state_dict()
    full_opt = opt.state_dict()

    sharded = copy.deepcopy(whole)
    layout = _shard_locally(sharded, ep_rank)
    assert [expert_shard(m).offset for m in (sharded.grouped, sharded.template)] == [2 * ep_rank] * 2
    assert sum(p.numel() for p in expert_parameters(sharded)) * 2 == sum(p.numel() for p in expert_parameters(whole))
    sharded_opt = torch.optim.Adam([
        {"params": [p for n, p in sharded.named_parameters() if "experts" in n], "lr": 0.1},
        {"params": [p for n, p in sharded.named_parameters() if "experts" not in n]}])
    olayout = OptimizerLayout(sharded_opt, sharded, layout)
    # The logical groups list parameters exactly as the unsharded optimizer does.
    names = {id(p): n for n, p in whole.named_parameters()}
    assert olayout.logical_groups == [[names[id(p)] for p in g["params"]] for g in opt.param_groups]

    local = local_model_state(full_state, sharded.state_dict(), layout)
    sharded.load_state_dict(local, strict=True)
    assert torch.equal(sharded.grouped.experts.w1, whole.grouped.experts.w1[2 * ep_rank:2 * ep_rank + 2])
    assert torch.equal(sharded.template.experts.experts[1][0].weight, whole.template.experts.experts[2 * ep_rank + 1][0]
                       .weight)

    sharded_opt.load_state_dict(local_optimizer_state(full_opt, olayout))
    by_param = {id(p): st for p, st in sharded_opt.state.items()}
    assert torch.equal(by_param[id(sharded.grouped.experts.b2)]["exp_avg"],
                       opt.state[whole.grouped.experts.b2]["exp_avg"][2 * ep_rank:2 * ep_rank + 2])
    assert torch.equal(by_param[id(sharded.template.experts.experts[0][2].weight)]["exp_avg_sq"],
                       opt.state[whole.template.experts.experts[2 * ep_rank][2].weight]["exp_avg_sq"])
    assert torch.equal(by_param[id(sharded.inp.weight)]["exp_avg"], opt.state[whole.inp.weight]["exp_avg"])
    assert sharded_opt.param_groups[0]["lr"] == 0.1


def test_optimizer_groups_must_hold_whole_expert_blocks():
    model = _TwoLayers()
    layout = _shard_locally(model, 0)
    experts = model.template.experts.experts
    rest = [p for n, p in model.named_parameters() if "template.experts.experts.0" not in n]
    opt = torch.optim.SGD([{"params": list(experts[0].parameters())}, {"params": rest}], lr=0.1)
    with pytest.raises(ValueError, match="only some expert modules of 'template.experts'"):
        OptimizerLayout(opt, model, layout)
