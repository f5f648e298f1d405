"""Routing-quality metrics: values from layers and raw routing tensors, and the 2-process synced value."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_moe import MoE
from lightning_moe.metrics import DroppedTokenRate, ExpertLoad, LoadImbalance, RoutingEntropy


def test_expert_load_from_layer_and_raw_ids_agree():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=8)
    from_layer, from_ids = ExpertLoad(4), ExpertLoad(4)
    expected = torch.zeros(4, dtype=torch.long)
    for n in (5, 7):
        x = torch.randn(n, 8)
        layer(x)
        from_layer.update(layer)
        from_ids.update(layer.router(x).top_ids_TK)
        expected += layer.tokens_per_expert
    assert torch.equal(from_layer.compute(), expected)
    assert torch.equal(from_ids.compute(), expected)
    assert int(expected.sum()) == (5 + 7) * 2


def test_expert_load_ignores_padding_and_normalizes():
    metric = ExpertLoad(3, normalize=True)
    metric.update(torch.tensor([[0, 1], [3, 3], [0, 2]]))  # id 3 = padded token
    torch.testing.assert_close(metric.compute(), torch.tensor([0.5, 0.25, 0.25]))


def test_load_imbalance_values():
    balanced = LoadImbalance(4)
    balanced.update(torch.tensor([[0], [1], [2], [3]]))
    assert balanced.compute().item() == 1.0
    skewed = LoadImbalance(4)
    skewed.update(torch.tensor([[0], [0], [0], [0], [0], [1], [2], [3]]))
    assert skewed.compute().item() == pytest.approx(2.5)
    assert LoadImbalance(4).compute().item() == 1.0  # nothing routed
    # the union of updates, not the mean of per-update ratios
    union = LoadImbalance(2)
    union.update(torch.tensor([[0], [0]]))
    union.update(torch.tensor([[1], [1]]))
    assert union.compute().item() == 1.0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
def test_dropped_rate_raw_ids_match_the_layer(capacity_factor):
    torch.manual_seed(1)
    layer = MoE(8, 4, top_k=2, hidden_dim=8, capacity_factor=capacity_factor)
    from_layer = DroppedTokenRate()
    from_ids = DroppedTokenRate(num_experts=4, capacity_factor=capacity_factor)
    dropped = assignments = 0
    for n in (6, 9):
        x = torch.randn(n, 8)
        x[:, 0] += 2.0  # skew the routing so that capacity binds
        layer(x)
        from_layer.update(layer)
        from_ids.update(layer.router(x).top_ids_TK)
        dropped, assignments = dropped + int(layer.dropped_tokens), assignments + n * 2
    assert from_layer.compute().item() == pytest.approx(dropped / assignments)
    assert from_ids.compute().item() == pytest.approx(dropped / assignments)
    if capacity_factor < 1:
        assert dropped > 0


def test_dropped_rate_dropless_and_expert_choice():
    dropless = DroppedTokenRate(num_experts=2)
    dropless.update(torch.tensor([[0], [0], [0]]))
    assert dropless.compute().item() == 0.0
    torch.manual_seed(2)
    layer = MoE(8, 4, top_k=1, hidden_dim=8, router="expert_choice", capacity_factor=1.0)
    layer(torch.randn(12, 8))
    metric = DroppedTokenRate()
    metric.update(layer)
    assert metric.compute().item() == pytest.approx(int(layer.dropped_tokens) / 12)


def test_routing_entropy_weights_tokens():
    metric = RoutingEntropy()
    metric.update(torch.tensor([[0.5, 0.5]]))  # log 2, one token
    metric.update(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))  # 0, three tokens
    assert metric.compute().item() == pytest.approx(math.log(2) / 4)
    torch.manual_seed(3)
    layer = MoE(8, 4, top_k=2, hidden_dim=8)
    x = torch.randn(10, 8)
    layer(x)
    from_layer, from_scores = RoutingEntropy(), RoutingEntropy()
    from_layer.update(layer)
    from_scores.update(layer.router(x).scores_TE)
    assert from_layer.compute().item() == pytest.approx(layer.router_entropy.item(), rel=1e-6)
    assert from_scores.compute().item() == pytest.approx(layer.router_entropy.item(), rel=1e-6)


def test_padding_is_not_counted_from_layers():
    torch.manual_seed(4)
    layer = MoE(8, 4, top_k=2, hidden_dim=8, capacity_factor=1.0)
    x, pad = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 2:] = True  # 3 padded tokens
    layer(x, padding_mask=pad)
    load, drops = ExpertLoad(4), DroppedTokenRate()
    load.update(layer)
    drops.update(layer)
    assert int(load.compute().sum()) == 7 * 2
    assert int(drops.assignments) == 7 * 2


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="num_experts=0 must be a positive int"):
        ExpertLoad(0)
    with pytest.raises(ValueError, match="capacity_factor=-1"):
        DroppedTokenRate(4, capacity_factor=-1)
    with pytest.raises(ValueError, match="one metric per layer"):
        LoadImbalance(8).update(MoE(8, 4, hidden_dim=8))
    with pytest.raises(ValueError, match=r"ids.view\(-1, 1\)"):
        ExpertLoad(4).update(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="build the metric with num_experts"):
        DroppedTokenRate().update(torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="router probabilities"):
        RoutingEntropy().update(torch.tensor([[0, 1]]))


# -- two gloo processes ---------------------------------------------------------------------------

def _rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unequal shards: rank 0 has 6 tokens, rank 1 has 14 skewed ones."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(6 + 8 * rank, 8, generator=g)
    x[:, 0] += 2.0 * rank
    return x, x[: 3 + rank]


def _metrics() -> list:
    return [ExpertLoad(4), LoadImbalance(4), DroppedTokenRate(4, capacity_factor=0.75), RoutingEntropy()]


def _update(metrics: list, layer: MoE, rank: int) -> None:
    for x in _rank_inputs(rank):
        layer(x)
        for metric in metrics:
            metric.update(layer)
        metrics[1].update(layer.router(x).top_ids_TK)  # raw ids too
        metrics[2].update(layer.router(x).top_ids_TK)


def _layer() -> MoE:
    torch.manual_seed(5)
    return MoE(8, 4, top_k=2, hidden_dim=8, capacity_factor=0.75)


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        metrics = _metrics()
        _update(metrics, _layer(), rank)
        torch.save([m.compute() for m in metrics], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_synced_value_equals_single_process_value_on_the_union(tmp_path):
    # This process is rank 0 and one spawned interpreter rank 1: one interpreter start (~5 s of imports), not two.
    port = _free_port()
    child = mp.get_context("spawn").Process(target=_worker, args=(1, port, str(tmp_path)), daemon=True)
    child.start()
    try:
        _worker(0, port, str(tmp_path))
    finally:
        child.join(timeout=120)
    assert child.exitcode == 0
    synced = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    single, rank0_only = _metrics(), _metrics()
    layer = _layer()
    for rank in (0, 1):
        _update(single, layer, rank)
    _update(rank0_only, _layer(), 0)
    expected = [m.compute() for m in single]
    local = [m.compute() for m in rank0_only]
    for values in synced:
        for value, want in zip(values, expected, strict=True):
            torch.testing.assert_close(value, want)
    # the synced values are not simply rank 0's
    assert not all(torch.allclose(a.float(), b.float()) for a, b in zip(local, expected, strict=True))
