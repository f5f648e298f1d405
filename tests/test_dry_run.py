"""Dry run: one rank of a planned job built for real: rank shares, the simulated EP dispatcher, one step."""

import copy
import dataclasses
import json
import math

import pytest
import torch

from lightning_moe import MoE
from lightning_moe.distributed import shard_moe_layer
from lightning_moe.distributed.simulated import SimulatedExpertParallel
from lightning_moe.dry_run import (
    SimulationReport,
    materialise_rank,
    rank_coordinates,
    shard_for_rank,
    simulate_step,
    simulation_layout,
)
from lightning_moe.models import build_model, num_params
from lightning_moe.plan import PRESETS, Architecture, Layout, count_params, params_per_rank

from launch import run_script

GIB = 1024**3
# Small model with the trillion preset's structure: GQA, a leading dense layer, shared expert, swiglu.
SMALL = Architecture(3, 32, 4, 64, 16, 8, 2, kv_heads=2, head_dim=8, ffn_hidden=48, shared_experts=1, dense_layers=1)


@pytest.fixture(scope="module")
def trillion_on_meta():
    return build_model(PRESETS["trillion"], device="meta")


def test_trillion_model_on_meta_has_the_planned_count(trillion_on_meta):
    arch = PRESETS["trillion"]
    # Independent count of the preset: untied 163840 x 7168 embeddings, 64 GQA blocks (56 heads, 8 kv heads of
    # 128), one dense swiglu FFN of 18432, 63 MoE layers of 400 routed + 1 shared swiglu experts of 2048.
    d, expert = 7168, 3 * 7168 * 2048
    attention = d * 56 * 128 * 2 + d * 8 * 128 * 2
    expected = 2 * 163840 * d + 64 * (attention + 2 * d) + d + 3 * d * 18432 + 63 * (401 * expert + d * 400)
    assert num_params(trillion_on_meta) == expected == count_params(arch).total >= 1e12
    assert all(p.is_meta for p in trillion_on_meta.parameters())


@pytest.mark.parametrize(("ep", "rank"), [(400, 4321), (400, 0), (100, 9_999), (16, 17)])
def test_full_size_rank_share_on_meta_equals_planner(trillion_on_meta, ep, rank):
    arch, layout = PRESETS["trillion"], Layout(gpus=10_000, gpu_memory=80 * GIB, ep=ep)
    model = copy.deepcopy(trillion_on_meta)
    shards = shard_for_rank(model, rank, layout)
    local = 400 // ep
    assert len(shards) == arch.moe_layers == 63
    assert {(s.offset, s.num_local) for s in shards} == {((rank % ep) * local, local)}
    assert num_params(model) == params_per_rank(arch, layout).materialised
    per_expert = 3 * 7168 * 2048
    assert num_params(model) == count_params(arch).total - 63 * (400 - local) * per_expert
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(("gpus", "ep", "rank"), [(8, 1, 3), (8, 2, 5), (16, 4, 6), (8, 8, 7)])
def test_materialised_count_equals_planner(gpus, ep, rank):
    layout = Layout(gpus=gpus, gpu_memory=GIB, ep=ep)
    model = build_model(SMALL)
    shard_for_rank(model, rank, layout)
    assert materialise_rank(model, seed=1) == params_per_rank(SMALL, layout).materialised
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert sum(p.numel() for p in model.parameters() if p.device.type == "cpu") == num_params(model)


def test_materialising_keeps_tied_embeddings_tied():
    arch = dataclasses.replace(SMALL, tie_embeddings=True)
    model = build_model(arch)
    assert materialise_rank(model) == count_params(arch).total
    assert model.head.weight is model.embed.weight and model.head.weight.device.type == "cpu"


def test_rank_share_equals_the_slice_of_the_whole_model():
    whole = build_model(SMALL)
    materialise_rank(whole, seed=3)
    layout = Layout(gpus=8, gpu_memory=GIB, ep=4)
    share = build_model(SMALL)
    shard_for_rank(share, 6, layout)  # ep_rank 2: experts 4, 5
    materialise_rank(share, seed=3)
    full, part = whole.state_dict(), share.state_dict()
    assert full.keys() == part.keys()
    for name, value in part.items():
        expected = full[name][4:6] if ".ffn.experts." in name else full[name]
        assert torch.equal(value, expected), name
    assert torch.equal(part["blocks.0.ffn.w1.weight"], full["blocks.0.ffn.w1.weight"])
    # Expert g of different layers, and the shared expert, are initialised differently.
    assert not torch.equal(full["blocks.1.ffn.experts.w1"][0], full["blocks.2.ffn.experts.w1"][0])
    assert not torch.equal(full["blocks.1.ffn.experts.w1"][0], full["blocks.1.ffn.shared_experts.w1"][0])
    other = build_model(SMALL)
    materialise_rank(other, seed=4)
    assert not torch.equal(other.state_dict()["blocks.1.attn.q.weight"], full["blocks.1.attn.q.weight"])


def test_rank_coordinates_follow_the_strategy_mesh():
    layout = Layout(gpus=10_000, gpu_memory=GIB, ep=400)
    assert rank_coordinates(4321, layout) == (321, 10)  # mesh ("data", "expert") of shape (25, 400)
    with pytest.raises(ValueError, match="rank=10000 must be in"):
        rank_coordinates(10_000, layout)
    with pytest.raises(ValueError, match="ep=3 must divide experts=8"):
        shard_for_rank(build_model(SMALL), 0, Layout(gpus=6, gpu_memory=GIB, ep=3))
    model = build_model(SMALL)
    shard_for_rank(model, 0, Layout(gpus=8, gpu_memory=GIB, ep=2))
    with pytest.raises(ValueError, match="already sharded"):
        shard_for_rank(model, 1, Layout(gpus=8, gpu_memory=GIB, ep=2))


def _layer(experts=8, dim=16, seed=0):
    torch.manual_seed(seed)
    return MoE(dim, experts, top_k=2, hidden_dim=24, activation="swiglu")


def test_simulated_dispatcher_with_one_rank_is_the_plain_layer():
    plain, simulated = _layer(), _layer()
    shard = shard_moe_layer(simulated, "", ep_rank=0, ep_size=1, group=None)
    simulated.expert_dispatcher = SimulatedExpertParallel(shard)
    x = torch.randn(3, 5, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), simulated(x2)
    (y1.square().sum()).backward()
    (y2.square().sum()).backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(plain.experts.w1.grad, simulated.experts.w1.grad)
    assert simulated.expert_dispatcher.bytes_sent == simulated.expert_dispatcher.bytes_received == 0


def test_simulated_dispatcher_runs_every_row_on_the_local_expert_of_its_index():
    P, r, E, D = 4, 1, 8, 16
    L = E // P
    layer = _layer(E, D, seed=1)
    whole = copy.deepcopy(layer.experts)
    shard = shard_moe_layer(layer, "", ep_rank=r, ep_size=P, group=None)
    sim = SimulatedExpertParallel(shard)
    torch.manual_seed(2)
    counts = [3, 0, 5, 2, 4, 1, 0, 6]
    x_MD = torch.randn(sum(counts), D, requires_grad=True)
    y_MD = sim(x_MD, sim.plan(torch.tensor(counts)), layer.experts)
    # Reference, row by row: global expert g -> local expert g % L of this rank (experts r*L .. r*L+L-1).
    expert_of_row = [g for g, c in enumerate(counts) for _ in range(c)]
    for i, g in enumerate(expert_of_row):
        local = r * L + g % L
        ref = whole(x_MD[i:i + 1].detach(), [1 if e == local else 0 for e in range(E)])
        torch.testing.assert_close(y_MD[i:i + 1], ref)
    own_rows = sum(counts[r * L:(r + 1) * L])
    crossing = (sum(counts) - own_rows) * D * 4
    assert sim.rows_processed == sum(counts)
    assert sim.bytes_sent == sim.bytes_received == 2 * crossing  # dispatch + combine
    y_MD.square().sum().backward()
    assert sim.bytes_sent == sim.bytes_received == 4 * crossing  # and their gradients
    assert x_MD.grad is not None and layer.experts.w1.grad.abs().sum() > 0


def test_simulated_dispatcher_rejects_a_foreign_layer():
    shard = shard_moe_layer(_layer(), "", ep_rank=0, ep_size=2, group=None)
    with pytest.raises(ValueError, match="counts for 4 experts"):
        SimulatedExpertParallel(shard).plan(torch.tensor([1, 1, 1, 1]))


def test_moe_combine_keeps_no_third_copy_of_the_routed_rows():
    # Regression: the combine's index_add kept its [M, D] weighted source alive for backward, on top of the
    # expert input and output the planner counts (2 rows of D per assignment).
    layer = _layer(8, 16)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(10, 16))
    assert list(saved.values()).count(20 * 16 * 4) == 2  # M = 10 * top_k rows of D = 16 floats


def _simulate_in_fresh_process(tmp_path, arch, layout, rank: int, steps: int) -> SimulationReport:
    params = {"arch": dataclasses.asdict(arch), "layout": dataclasses.asdict(layout), "rank": rank, "steps": steps}
    (result,) = run_script("dry_run_step.py", json.dumps(params), out=tmp_path, timeout=300).results
    return SimulationReport(**{**result, "local_experts": tuple(result["local_experts"])})


def test_one_rank_step_at_small_scale(tmp_path):
    arch = dataclasses.replace(SMALL, dim=64, vocab=4096)  # MiBs of weights, so that RSS sees them
    layout = simulation_layout(Layout(gpus=8, gpu_memory=GIB, ep=4), seq_len=16, micro_batch=2)
    report = _simulate_in_fresh_process(tmp_path, arch, layout, rank=5, steps=2)
    per_rank = params_per_rank(arch, layout)
    assert (report.ep_rank, report.dp_rank, report.local_experts) == (1, 1, (2, 3))
    assert report.materialised_params == report.predicted_params == per_rank.materialised
    assert report.predicted_bytes > report.predicted_state_bytes == 16 * per_rank.materialised  # fp32 w, g, 2 Adam
    assert report.peak_bytes >= report.state_bytes >= report.param_bytes > 0
    assert report.ratio == report.peak_bytes / report.predicted_bytes
    # Saved for backward beyond the planner's terms: RMSNorm's normalised input, the attention output next to
    # the o-projection input, silu(gate) next to gate (unfused SwiGLU), router probabilities, int64 indices.
    assert report.predicted_activation_bytes < report.saved_activation_bytes < 1.6 * report.predicted_activation_bytes
    assert report.step_seconds > 0 and math.isfinite(report.loss)
    assert report.expert_rows == arch.moe_layers * 2 * 16 * arch.top_k
    # Balanced, 3/4 of the 4 * M * D fp32 values per layer cross ranks; this routing is random, so within 50%.
    assert report.bytes_sent == report.bytes_received > 0
    assert report.predicted_all_to_all_bytes == arch.moe_layers * 4 * (2 * 16 * 2) * 64 * 4 * 3 // 4
    assert report.predicted_all_to_all_bytes * 0.5 < report.bytes_sent < report.predicted_all_to_all_bytes * 1.5
    assert "measured / predicted" in report.table()


def test_simulate_step_rejects_what_it_does_not_simulate():
    with pytest.raises(ValueError, match="simulation_layout"):
        simulate_step(SMALL, Layout(gpus=8, gpu_memory=GIB, ep=4))
    with pytest.raises(ValueError, match="steps=1 must be >= 2"):
        simulate_step(SMALL, simulation_layout(Layout(gpus=8, gpu_memory=GIB, ep=4)), steps=1)
    with pytest.raises(ValueError, match="ep=3 must divide experts=8"):
        simulate_step(SMALL, simulation_layout(Layout(gpus=6, gpu_memory=GIB, ep=3)))
