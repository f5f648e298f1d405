"""MoEStrategy(data_parallel="fsdp"): FSDP2 for dense parameters, experts sharded over the ranks holding them.

Multi-process runs start ``tests/scripts/fsdp_train.py`` (Lightning's popen launcher starts the other ranks); the
final weights come back through the strategy's own DCP checkpoint, consolidated here in one process, and are
compared with single-process AdamW on the same global batches (``fsdp_models.reference_train``). Aux and z
losses are off (each rank computes them on its own tokens). AdamW has ``eps=1e-3``: Adam's normalisation would
amplify rounding in near-zero gradients.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from lightning_moe.distributed.fsdp import find_blocks  # noqa: E402
from lightning_moe.distributed.materialise import materialise  # noqa: E402
from lightning_moe.models import Transformer  # noqa: E402
from lightning_moe.strategy import MoEStrategy, consolidate_checkpoint  # noqa: E402

from ep_models import make_data  # noqa: E402
from fsdp_models import ARCH, AdamWModel, MetaTransformer, reference_train  # noqa: E402
from helpers import TinyMoE  # noqa: E402
from launch import run_script  # noqa: E402

TOL = 1e-5
TRAIN = {"steps": 5, "accumulate": 2, "clip": 0.05}  # 5 AdamW steps of 2 micro-batches, norm clipping


def _fit(out, devices: int, ep: int, **params):
    params = {"devices": devices, "ep": ep, **TRAIN, **params}
    return run_script("fsdp_train.py", "fit", json.dumps(params), out=out, ranks=devices, timeout=900)


def _max_diff(state: dict, reference: dict) -> float:
    assert set(state) == set(reference), set(state) ^ set(reference)
    return max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())


@pytest.fixture(scope="module")
def expected():
    return reference_train(**TRAIN)


# -- single process: the pieces --------------------------------------------------------------------------------


def test_blocks_are_found_without_user_code():
    assert find_blocks(Transformer(ARCH, device="meta")) == ["blocks.0", "blocks.1", "blocks.2"]  # dense one too
    assert find_blocks(TinyMoE(num_layers=2)) == ["layers.0", "layers.1"]
    assert find_blocks(AdamWModel()) == ["net.moe1", "net.moe2"]  # no container: each MoE layer is its own block


def test_materialise_refuses_parameters_it_cannot_initialise():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(3, device="meta"))

    with pytest.raises(ValueError, match=r"parameters \['w'\] belong to modules without reset_parameters"):
        materialise(Raw())


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="data_parallel='zero' must be one of"):
        MoEStrategy(data_parallel="zero")
    with pytest.raises(ValueError, match="use checkpoint='sharded'"):
        MoEStrategy(data_parallel="fsdp", checkpoint="full")
    assert MoEStrategy(data_parallel="fsdp")._checkpoint == "sharded"


def test_moe_fsdp_is_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["moe_fsdp"]["init_params"] == {"data_parallel": "fsdp"}


@pytest.mark.distributed
def test_two_ranks_with_default_balancing_losses_equal_one_process(tmp_path):
    # Issue 16 under FSDP2: the default aux/z coefficients with aux_loss_scope="global" (counts summed over
    # the world by the strategy's count reduction) give the single-process model on the global batch.
    reference = reference_train(**TRAIN, aux_losses=True).state_dict()
    _fit(tmp_path, devices=2, ep=2, aux_losses=True)
    full = consolidate_checkpoint(tmp_path / "final", tmp_path / "final.ckpt")
    assert _max_diff(full["state_dict"], reference) < TOL
    assert _max_diff(reference_train(**TRAIN).state_dict(), reference) > 1e-4  # the losses changed the model


# -- 2 ranks -------------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("ep", [2, 1])
def test_two_ranks_equal_one_process(tmp_path, expected, ep):
    run = _fit(tmp_path, devices=2, ep=ep)
    full = consolidate_checkpoint(tmp_path / "final", tmp_path / "final.ckpt")
    reference = expected.state_dict()
    assert _max_diff(full["state_dict"], reference) < TOL
    assert _max_diff(AdamWModel().state_dict(), reference) > 1e-2  # the comparison can fail: training moved
    # The optimizer state is the single process's, indexed as its optimizer indexes it.
    ref_opt = expected.reference_optimizer.state_dict()
    saved = full["optimizer_states"][0]
    assert saved["param_groups"][0]["params"] == ref_opt["param_groups"][0]["params"]
    for idx, st in ref_opt["state"].items():
        assert (saved["state"][idx]["exp_avg"] - st["exp_avg"]).abs().max() < TOL
        assert int(saved["state"][idx]["step"]) == 5
    # Every tensor is a shard: experts split in two (over experts at ep 2, over their width at ep 1), dense too.
    experts = sum(v.numel() for k, v in reference.items() if ".experts." in k)
    dense = sum(v.numel() for k, v in reference.items() if ".experts." not in k and "expert_bias" not in k)
    assert all(r["all_sharded"] for r in run.results)
    assert [r["expert_local_numel"] for r in run.results] == [experts // 2] * 2
    assert sum(r["dense_local_numel"] for r in run.results) == dense
    # The consolidated file loads in a plain process, weights only.
    model = AdamWModel.load_from_checkpoint(tmp_path / "final.ckpt", weights_only=True)
    assert _max_diff(model.state_dict(), reference) < TOL


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [((1, 1), (2, 2)), pytest.param(((4, 2),), marks=pytest.mark.slow)])
def test_meta_init_is_independent_of_the_world_size(tmp_path, sizes):
    expected = MetaTransformer()
    with torch.device("meta"):
        expected.configure_model()
    materialise(expected, seed=5)  # one process, the whole model
    for devices, ep in sizes:
        out = tmp_path / str(devices)
        run = run_script("fsdp_train.py", "init", json.dumps({"devices": devices, "ep": ep}), out=out, ranks=devices,
                         timeout=600)
        assert not any(r["meta_left"] for r in run.results) and not any(r["broadcasts"] for r in run.results)
        full = consolidate_checkpoint(out / "init")["state_dict"]
        assert _max_diff(full, expected.state_dict()) == 0.0, devices


@pytest.mark.distributed
def test_ddp_mode_materialises_meta_models_seeded_without_broadcasting_experts(tmp_path):
    expected = MetaTransformer(meta=True)
    expected.configure_model()
    materialise(expected, seed=5)
    params = {"devices": 2, "ep": 2, "data_parallel": "ddp"}
    run = run_script("fsdp_train.py", "init", json.dumps(params), out=tmp_path, ranks=2, timeout=600)
    assert [r["broadcasts"] for r in run.results] == [0, 0]  # before: every expert bank, whole, from rank 0
    full = torch.load(tmp_path / "init", weights_only=True)["state_dict"]  # gathered to rank 0
    assert _max_diff(full, expected.state_dict()) == 0.0


@pytest.mark.distributed
def test_model_stays_sharded_through_fit_validate_test_predict(tmp_path):
    run = run_script("fsdp_train.py", "stages", json.dumps({"devices": 2, "ep": 2}), out=tmp_path, ranks=2,
                     timeout=900)
    model = reference_train(steps=5).eval()
    x, y = make_data(2, seed=3)  # the 2 global batches eval_loader slices
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(x), y).item()
        per_rank = [torch.cat([model(x[r * 4:(r + 1) * 4]), model(x[8 + r * 4:8 + (r + 1) * 4])]) for r in (0, 1)]
    for rank, result in enumerate(run.results):
        assert result["after_fit"] and result["still_sharded"]
        assert abs(result["val_loss"] - loss) < TOL and abs(result["test_loss"] - loss) < TOL
        assert (torch.tensor(result["predictions"]) - per_rank[rank].flatten()).abs().max() < TOL


@pytest.mark.distributed
def test_bf16_true_keeps_routers_float32_with_router_precision(tmp_path):
    run = _fit(tmp_path, devices=2, ep=2, steps=2, precision="bf16-true", router_precision=True)
    for result in run.results:  # the routers are FSDP units of their own (FSDP2 shards one dtype per unit)
        assert result["router_dtypes"] == ["torch.float32"] and result["expert_dtypes"] == ["torch.bfloat16"]
        assert result["global_step"] == 2 and result["finite"]


@pytest.mark.distributed
def test_a_rank_whose_experts_get_no_token_completes_bf16_steps(tmp_path):
    run = run_script("fsdp_train.py", "zero_tokens", json.dumps({"devices": 2, "ep": 2}), out=tmp_path, ranks=2,
                     timeout=300)
    for result in run.results:
        assert result["global_step"] == 2
        for counts in result["counts"]:
            assert counts[0] > 0 and counts[2] == counts[3] == 0  # experts 2 and 3 (EP rank 1) got nothing


# -- 4 ranks: ep 2 x data 2, and its checkpoint resumed at 2 ranks and in 1 process ------------------------------


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_w4")
    return out, _fit(out, devices=4, ep=2, every=3)


@pytest.mark.distributed
@pytest.mark.slow
def test_four_ranks_ep2_x_data2_equal_one_process(four_ranks, expected):
    out, run = four_ranks
    assert _max_diff(consolidate_checkpoint(out / "final")["state_dict"], expected.state_dict()) < TOL
    reference = expected.state_dict()
    experts = sum(v.numel() for k, v in reference.items() if ".experts." in k)
    assert [r["expert_local_numel"] for r in run.results] == [experts // 4] * 4


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("devices", "ep", "mode"), [(2, 2, "fsdp"), (1, 1, "fsdp"), (2, 2, "ddp")])
def test_checkpoint_of_four_ranks_resumes_at_other_sizes(four_ranks, expected, tmp_path, devices, ep, mode):
    out, _ = four_ranks
    checkpoint = out / "stepstep=3.ckpt"
    assert (checkpoint / ".metadata").is_file()
    _fit(tmp_path, devices=devices, ep=ep, resume=str(checkpoint), data_parallel=mode)
    if mode == "fsdp":
        final = consolidate_checkpoint(tmp_path / "final")["state_dict"]
    else:  # the same directory resumed under DDP, which saves a full file
        final = torch.load(tmp_path / "final", weights_only=True)["state_dict"]
    assert _max_diff(final, expected.state_dict()) < TOL

# -- full files from DCP directories, one tensor at a time; full files mapped, not read --------------------------


def test_consolidate_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from lightning_moe.distributed.sharded_checkpoint import save_sharded

    model = TinyMoE(num_layers=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_sharded({"state_dict": dict(state), "optimizer_states": [], "epoch": 1}, tmp_path / "ckpt", True)
    calls: list[int] = []
    load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda sd, **kwargs: (calls.append(len(sd)), load(sd, **kwargs))[1])
    full = consolidate_checkpoint(tmp_path / "ckpt", tmp_path / "full.ckpt")
    assert calls == [1] * len(state)  # one tensor per read, straight into the mapped file
    assert _max_diff(full["state_dict"], state) == 0.0
    loaded = torch.load(tmp_path / "full.ckpt", weights_only=True)  # a plain file, read in a plain process
    assert _max_diff(loaded["state_dict"], state) == 0.0 and loaded["epoch"] == 1


def test_ddp_mode_maps_full_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": TinyMoE().state_dict()}, path)
    seen = {}
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: (seen.update(kwargs), load(*args, **kwargs))[1])
    checkpoint = MoEStrategy().load_checkpoint(path)  # no process group: broadcast returns its input
    assert seen["mmap"] is True and set(checkpoint["state_dict"]) == set(TinyMoE().state_dict())


# -- the planner and the strategy agree ----------------------------------------------------------------------------

MEMORY_ARCH = {"layers": 4, "dim": 256, "heads": 4, "vocab": 2048, "expert_hidden": 256, "experts": 8, "top_k": 2,
               "kv_heads": 2, "ffn_hidden": 512, "shared_experts": 1, "dense_layers": 1}


@pytest.mark.distributed
@pytest.mark.parametrize(("devices", "ep"), [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow),
                                             pytest.param(4, 4, marks=pytest.mark.slow)])
def test_bytes_each_rank_holds_agree_with_the_planner(tmp_path, devices, ep):
    from lightning_moe.plan import Architecture, Layout, plan

    params = {"devices": devices, "ep": ep, "micro_batch": 2, "seq_len": 256, "arch": MEMORY_ARCH}
    run = run_script("fsdp_train.py", "memory", json.dumps(params), out=tmp_path, ranks=devices, timeout=900)
    layout = Layout(gpus=devices, gpu_memory=1 << 40, ep=ep, dense_sharding="fsdp", expert_sharding="fsdp",
                    weight_dtype="fp32", grad_dtype="fp32", optim_dtype="fp32", master_weights=False,
                    act_dtype="fp32", micro_batch=2, seq_len=256, flash_attention=True)
    for rank, measured in enumerate(run.results):
        planned = plan(Architecture(**MEMORY_ARCH), layout, rank=rank)
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):  # sums of local shard sizes
            assert abs(measured[key] / getattr(planned, key) - 1) < 0.02, (rank, key, measured[key])
        assert abs(measured["peak_bytes"] / planned.total_bytes - 1) < 0.15, (rank, measured, planned.total_bytes)


# -- one rank of the 10,000-GPU job, through the Trainer on torch's fake process group ---------------------------


@pytest.mark.slow
def test_trillion_example_runs_rank_4321_of_10000_within_the_targets(tmp_path):
    from launch import ROOT

    run = run_script(ROOT / "examples" / "trillion_plan.py", "--json", str(tmp_path / "out.json"), out=tmp_path,
                     ranks=0, timeout=600)
    report = json.loads((tmp_path / "out.json").read_text())
    assert (report["world_size"], report["rank"], report["data_parallel"]) == (10_000, 4321, "fsdp")
    ratio = {k: report[k]["measured"] / report[k]["planned"] for k in
             ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_bytes", "all_to_all_bytes")}
    assert all(abs(ratio[k] - 1) < 0.02 for k in ("param_bytes", "grad_bytes", "optimizer_bytes")), ratio
    assert abs(ratio["peak_bytes"] - 1) < 0.15 and abs(ratio["all_to_all_bytes"] - 1) < 0.01, ratio
    assert "1,123,030,293,504 parameters (planner 1,123,030,293,504)" in run.stdout
