"""Issue 14's defects, each a test that failed before its fix: strategy="moe" on 2 gloo processes against one.

Multi-process runs start ``tests/scripts/hardening.py`` (one scenario a launch) through ``tests/launch.py``; the
single-process references are plain PyTorch (``ep_models.reference_train``) or a one-device Trainer here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from hardening import DEAD, REVIVE, checkpointed_model, optimizer_model  # noqa: E402

from lightning_moe.strategy import consolidate_checkpoint  # noqa: E402

from ep_models import make_data, reference_train  # noqa: E402
from launch import run_script  # noqa: E402

TOL = 1e-5


def _scenario(name: str, out: Path, ranks: int = 2, timeout: float = 240, **params):
    return run_script("hardening.py", name, json.dumps(params), out=out, ranks=ranks, timeout=timeout,
                      env={"OMP_NUM_THREADS": "1"})


def _max_diff(state: dict, reference: dict) -> float:
    assert set(state) == set(reference), set(state) ^ set(reference)
    return max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())


# -- defect 2 ------------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(("clip", "hand_clip", "ep"), [(None, None, 2), (0.05, None, 2), (None, 0.05, 1)])
def test_manual_optimization_reduces_expert_gradients_once_per_step(tmp_path, clip, hand_clip, ep):
    """Two half-loss manual_backward calls per step on 2 ranks train exactly as one process on the global batch:
    at ep=2 without clipping and with clip_gradients before the step, at ep=1 (experts replicated) with
    torch.nn.utils.clip_grad_norm_ by hand before the step."""
    run = _scenario("manual", tmp_path, clip=clip, hand_clip=hand_clip, ep=ep)
    assert [r["steps"] for r in run.results] == [5, 5]
    expected = reference_train(clip=clip or hand_clip).state_dict()
    assert _max_diff(torch.load(tmp_path / "manual.pt", weights_only=True), expected) < TOL


# -- defect 3 ------------------------------------------------------------------------------------------------


def _assert_same_optimizer_state(saved: dict, expected: dict, tol: float = 0.0) -> None:
    assert saved["param_groups"][0]["params"] == expected["param_groups"][0]["params"]
    assert set(saved["state"]) == set(expected["state"])
    for idx, st in expected["state"].items():
        assert set(saved["state"][idx]) == set(st), idx
        for key, value in st.items():
            assert saved["state"][idx][key].shape == value.shape, (idx, key)
            assert (saved["state"][idx][key].float() - value.float()).abs().max() <= tol, (idx, key)


@pytest.mark.distributed
def test_save_after_test_validate_predict_keeps_every_experts_optimizer_state(tmp_path):
    """fit with Adam at ep=2, then save; test, save; validate + predict, save: the three optimizer states are the
    same, and each holds every expert's moments as one process on the global batch has them."""
    _scenario("save_after_stages", tmp_path)
    ckpts = [torch.load(tmp_path / f"after_{stage}.ckpt", weights_only=True)["optimizer_states"][0]
             for stage in ("fit", "test", "predict")]
    reference = reference_train(adam=True).reference_optimizer.state_dict()
    _assert_same_optimizer_state(ckpts[0], reference, tol=1e-4)
    for later in ckpts[1:]:
        _assert_same_optimizer_state(later, ckpts[0])


# -- defect 4 ------------------------------------------------------------------------------------------------


def _expected_full_state(dumps: list[dict], names: list[str]) -> dict[int, dict]:
    """The unsharded optimizer state assembled from each rank's local state (``hardening.dump_local_...``)."""
    full = {}
    for idx, name in enumerate(names):
        held = [d[name] for d in dumps if name in d]
        if not held:
            continue  # no state anywhere: the parameter never had a gradient
        if len(held) == 1 or held[0][0] < 0:  # a template expert (one owner) or a dense parameter (replicated)
            full[idx] = held[0][1]
            continue
        held.sort(key=lambda entry: entry[0])  # stacked experts: rows of every rank, in expert order
        local = {k: v for k, v in held[0][1].items()}
        rows = next(v.shape[0] for v in local.values() if v.ndim)
        full[idx] = {k: torch.cat([h[1][k] for h in held]) if v.ndim and v.shape[0] == rows else v
                     for k, v in local.items()}
    return full


def _assert_equal_states(saved: dict[int, dict], expected: dict[int, dict], names: list[str]) -> None:
    assert sorted(saved) == sorted(expected), sorted({names[i] for i in set(saved) ^ set(expected)})
    for idx, state in expected.items():
        assert sorted(saved[idx]) == sorted(state), names[idx]
        for key, value in state.items():
            assert torch.equal(saved[idx][key], value), (names[idx], key)


@pytest.mark.distributed
@pytest.mark.parametrize(("optimizer", "checkpoint"), [("adam", "full"), ("adafactor", "full"),
                                                       ("adafactor", "sharded")])
def test_checkpoints_hold_every_experts_optimizer_state(tmp_path, optimizer, checkpoint):
    """ep=2 with a template expert that gets no token before step 2 (no state on its rank), Adam or Adafactor
    (factored states of another shape than the parameter): the full checkpoints at step 2, at step 4 and after fit
    hold exactly what the owning ranks hold, per expert (a sharded directory once consolidated); a resume from
    step 2 ends on the uninterrupted weights; the file steps an unsharded optimizer in one process."""
    _scenario("optimizer_states", tmp_path, optimizer=optimizer, checkpoint=checkpoint)

    def load(name: str) -> dict:
        if checkpoint == "sharded":
            return consolidate_checkpoint(tmp_path / name)
        return torch.load(tmp_path / name, weights_only=True)

    model = optimizer_model(optimizer)
    names = [n for n, _ in model.named_parameters()]
    dead = [i for i, n in enumerate(names) if n.startswith(f"net.moe2.experts.experts.{DEAD}.")]
    for step, files in ((REVIVE, [f"step{REVIVE}.ckpt"]), (4, ["step4.ckpt", "final.ckpt"])):
        dumps = [torch.load(tmp_path / f"local_step{step}_rank{r}.pt", weights_only=True) for r in range(2)]
        expected = _expected_full_state(dumps, names)
        assert dead and (step == REVIVE) == (not set(dead) & set(expected))  # starved until REVIVE, then stepped
        for name in files:
            saved = load(name)["optimizer_states"][0]
            _assert_equal_states(saved["state"], expected, names)
    if optimizer == "adam":  # the revived expert took 2 steps, the others 4: steps are per expert
        assert {float(expected[i]["step"]) for i in dead} == {4.0 - REVIVE}
        assert float(expected[0]["step"]) == 4.0
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt", weights_only=True)
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())

    ckpt = load("final.ckpt")
    model.load_state_dict(ckpt["state_dict"])
    opt = model.configure_optimizers()
    opt.load_state_dict(ckpt["optimizer_states"][0])
    x, y = make_data(1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert all(p.isfinite().all() for p in model.parameters())


def test_expert_removal_keeps_factored_optimizer_state_per_expert():
    """Adafactor's factored states of stacked experts (row_var [E, D, 1], col_var [E, 1, H]) follow the kept
    experts, like the moments; the optimizer then steps the pruned layer."""
    from lightning_moe import MoE
    from lightning_moe.prune import remap_optimizers, remove_experts

    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=16)
    opt = torch.optim.Adafactor(layer.parameters(), lr=0.01)
    layer(torch.randn(16, 8)).pow(2).mean().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[layer.experts.w1].items()}
    remap_optimizers([opt], remove_experts(layer, torch.tensor([1, 3])))
    after = opt.state[layer.experts.w1]
    assert torch.equal(after["row_var"], before["row_var"][[1, 3]])
    assert torch.equal(after["col_var"], before["col_var"][[1, 3]])
    opt.zero_grad()
    layer(torch.randn(16, 8)).pow(2).mean().backward()
    opt.step()


# -- defect 5 ------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_low_rank_experts_defaults_agree_on_the_rank_under_expert_parallelism(tmp_path):
    """LowRankExperts() picks each weight's rank by energy: rank 0's experts need 2, rank 1's 3. The ranks agree
    (on 3) before factoring, the test and the gather after it complete, and every rank ends with the model one
    process gets from low_rank_experts."""
    run = _scenario("low_rank", tmp_path, timeout=180)
    for result in run.results:
        assert result["ranks"] == result["reference_ranks"] == {"w1": 3, "w2": 3}
        assert result["num_experts"] == 4
    state = torch.load(tmp_path / "low_rank.pt", weights_only=True)
    assert _max_diff(state, torch.load(tmp_path / "low_rank_reference.pt", weights_only=True)) < TOL


# -- defect 6 ------------------------------------------------------------------------------------------------


def _pruned_fit(tmp_path: Path, epochs: int, ckpt_path: Path | None = None, monitor=None):
    """TinyMoE (8 experts, Adam) pruned to 4 at the end of epoch 0; a checkpoint at the end of every epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_moe.callbacks import ExpertPruning

    from helpers import RegressionData, TinyMoE, make_trainer

    torch.manual_seed(0)
    model = TinyMoE(num_experts=8, optimizer="adam", lr=0.01)
    pruning = ExpertPruning(keep=4, at_epoch=0)
    callbacks = [pruning, ModelCheckpoint(dirpath=tmp_path, filename="epoch{epoch}", save_top_k=-1,
                                          auto_insert_metric_name=False)] + ([monitor] if monitor else [])
    trainer = make_trainer(max_steps=-1, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True,
                           default_root_dir=tmp_path)
    trainer.fit(model, datamodule=RegressionData(n=32, offset=1.5), ckpt_path=ckpt_path)
    return model, pruning


def test_checkpoint_after_expert_pruning_resumes_and_loads(tmp_path):
    """A checkpoint written after ExpertPruning (8 -> 4 experts) resumes into a fresh 8-expert model, which ends
    on the weights of an uninterrupted run, and loads with load_from_checkpoint in a fresh process's way."""
    from helpers import TinyMoE

    uninterrupted, pruning = _pruned_fit(tmp_path / "a", epochs=3)
    assert all(layer.num_experts == 4 for layer in uninterrupted.layers)
    resumed, resumed_pruning = _pruned_fit(tmp_path / "b", epochs=3, ckpt_path=tmp_path / "a" / "epoch1.ckpt")
    assert resumed_pruning.kept == pruning.kept
    state = resumed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in uninterrupted.state_dict().items())

    loaded = TinyMoE.load_from_checkpoint(tmp_path / "a" / "epoch2.ckpt", weights_only=True)
    assert [layer.num_experts for layer in loaded.layers] == [4, 4]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in uninterrupted.state_dict().items())
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x), uninterrupted(x))


@pytest.mark.parametrize(("every", "expected_steps", "expected_sizes"), [
    (3, [3, 4, 6, 8], [[8, 8], [8, 8], [4, 4], [4, 4]]),  # a window open when pruning: drawn first
    (4, [4, 8], [[8, 8], [4, 4]]),  # pruning right after a render: nothing to draw first
])
def test_expert_load_monitor_follows_expert_pruning(tmp_path, every, expected_steps, expected_sizes):
    """ExpertLoadMonitor across ExpertPruning (8 -> 4 experts at the end of epoch 0, 4 steps an epoch): the window
    before pruning is drawn with 8 experts, the later ones with 4."""
    pytest.importorskip("matplotlib")
    from lightning_moe.callbacks import ExpertLoadMonitor

    class Recording(ExpertLoadMonitor):
        def render(self, names, counts, dropped_share, step):
            self.renders = [*getattr(self, "renders", []), (step, [c.numel() for c in counts], int(counts[0].sum()))]
            return super().render(names, counts, dropped_share, step)

    monitor = Recording(every_n_steps=every, figsize=(4, 2), dpi=30)
    _pruned_fit(tmp_path, epochs=2, monitor=monitor)
    steps = [step for step, _, _ in monitor.renders]
    sizes = [size for _, size, _ in monitor.renders]
    assert steps == expected_steps and sizes == expected_sizes
    assert sum(total for _, _, total in monitor.renders) == 32 * 2 * 2  # 32 tokens x top-2, 2 epochs


@pytest.mark.distributed
@pytest.mark.parametrize("checkpoint", ["full", "sharded"])
def test_checkpoint_after_expert_pruning_resumes_under_expert_parallelism(tmp_path, checkpoint):
    """strategy="moe" (ep=2): ExpertPruning 8 -> 4 stacked experts at the end of epoch 0. The checkpoint of epoch 1
    resumes into a fresh 8-expert model, which ends on the uninterrupted run's weights; the full file (or the
    consolidated directory) loads with load_from_checkpoint."""
    from helpers import TinyMoE

    run = _scenario("prune_resume", tmp_path, checkpoint=checkpoint, timeout=300)
    for result in run.results:
        assert result["resumed"] == result["uninterrupted"]
        assert result["uninterrupted"]["num_experts"] == [4, 4]
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
    path = tmp_path / "uninterrupted" / "epoch2.ckpt"
    if checkpoint == "sharded":
        consolidate_checkpoint(path, tmp_path / "epoch2.full.ckpt")
        path = tmp_path / "epoch2.full.ckpt"
    loaded = TinyMoE.load_from_checkpoint(path, weights_only=True)
    assert [layer.num_experts for layer in loaded.layers] == [4, 4]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in uninterrupted.items())


# -- defect 7 ------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_magnitude_and_expert_pruning_keep_masked_experts_out_of_ddp(tmp_path):
    """ExpertMagnitudePruning renames expert weights (w1 -> w1_orig + w1_mask); ExpertPruning then re-wraps DDP.
    The new wrap ignores every expert name, masked ones included, so DDP neither broadcasts rank 0's experts
    over rank 1's nor averages their gradients."""
    run = _scenario("magnitude_and_expert_pruning", tmp_path, timeout=300)
    for result in run.results:
        assert result["rewrapped"] and result["masked"]
        assert result["missing"] == [] and result["ddp_experts"] == []
    assert run.results[0]["local_w1"] != run.results[1]["local_w1"]  # each rank still holds its own experts


# -- defect 8 ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smaller_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smaller")
    return _scenario("smaller", out, timeout=300)


@pytest.mark.distributed
def test_predict_with_unequal_batch_counts_raises_before_the_first_batch(smaller_run):
    for result in smaller_run.results:
        assert "predict" in result["predict"] and "[3, 2]" in result["predict"], result["predict"]


@pytest.mark.distributed
def test_resume_honours_the_users_weights_only_false(smaller_run):
    for result in smaller_run.results:
        assert result["resumed_full"] == 3 and result["resumed_sharded"] == 3, result


@pytest.mark.distributed
def test_clip_grad_norm_by_hand_warns_once_naming_gradient_clip_val(smaller_run):
    warned = smaller_run.results[0]["hand_clip_warnings"]
    assert len(warned) == 1 and "gradient_clip_val" in warned[0]
    assert smaller_run.results[1]["hand_clip_warnings"] == []  # rank 0 speaks for the job


def test_sharded_load_keeps_adams_step_on_the_cpu(tmp_path, monkeypatch):
    """A sharded (DCP) load reads each optimizer state onto its parameter's device, except the 0-dim ones (Adam's
    step), which stay on the CPU as torch keeps them. Parameters on the meta device stand in for an accelerator."""
    import torch.distributed.checkpoint as dcp

    from lightning_moe.distributed import sharded_checkpoint as sc
    from lightning_moe.distributed.shard_layout import OptimizerLayout, ShardLayout

    from helpers import TinyMoE

    model, layout = TinyMoE(), ShardLayout([])
    opt = torch.optim.Adam(model.parameters())
    model.task_loss((torch.randn(4, 8), torch.randn(4))).backward()
    opt.step()
    olayout = OptimizerLayout(opt, model, layout)
    sc.save_sharded({"state_dict": sc.sharded_model_state(model.state_dict(), layout, None),
                     "optimizer_states": [sc.sharded_optimizer_state(opt, olayout, None)]}, tmp_path / "ckpt", True)
    with torch.device("meta"):
        target = TinyMoE()
    target_opt = torch.optim.Adam(target.parameters())
    templates: dict = {}
    monkeypatch.setattr(dcp, "load", lambda template, **kwargs: templates.update(template))
    sc.load_sharded(tmp_path / "ckpt", target.state_dict(), [OptimizerLayout(target_opt, target, layout)], layout, None)
    devices = {key.rsplit("/", 1)[-1]: set() for key in templates if key.startswith("optim")}
    for key, value in templates.items():
        if key.startswith("optim"):
            devices[key.rsplit("/", 1)[-1]].add(value.device.type)
    assert devices == {"step": {"cpu"}, "exp_avg": {"meta"}, "exp_avg_sq": {"meta"}}


def test_running_weights_only_reads_the_trainer_entry_points_argument():
    """Trainer._run still takes weights_only (read from its frame by _compat.running_weights_only)."""
    import inspect

    from lightning.pytorch import Trainer

    from lightning_moe import _compat

    assert "weights_only" in inspect.signature(Trainer._run).parameters
    assert _compat.running_weights_only() is None  # outside a Trainer entry point


# -- defect 9 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_same_gradients_and_counts_once(tmp_path, mode):
    """Two MoE blocks under torch.utils.checkpoint, with gradient accumulation: the same weights (aux and z losses
    included, through the recomputed router) and expert biases as without checkpointing, and the counts that feed
    bias balancing, the ExpertLoad metric, ExpertLoadMonitor and ExpertPruning counted once per forward."""
    pytest.importorskip("matplotlib")
    from lightning_moe.callbacks import ExpertLoadMonitor, ExpertPruning

    from helpers import RegressionData, make_trainer

    class Recording(ExpertLoadMonitor):
        def render(self, names, counts, dropped_share, step):
            self.renders = [*getattr(self, "renders", []), [c.clone() for c in counts]]
            return super().render(names, counts, dropped_share, step)

    runs = {}
    for m in (None, mode):
        model = checkpointed_model(m)
        monitor, pruning = Recording(every_n_steps=1, figsize=(3, 2), dpi=20), ExpertPruning(keep=2, at_epoch=9)
        trainer = make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[monitor, pruning],
                               default_root_dir=tmp_path)
        trainer.fit(model, datamodule=RegressionData(n=48, offset=1.5))
        runs[m] = (model, monitor.renders, pruning.counts, model.load.compute())
    (plain, renders, counts, load), (ckpt, ckpt_renders, ckpt_counts, ckpt_load) = runs[None], runs[mode]
    assert _max_diff(ckpt.state_dict(), plain.state_dict()) < 1e-6
    assert plain.blocks[0].router.expert_bias.abs().sum() > 0  # balancing moved the biases
    assert len(ckpt_renders) == len(renders) == 3
    assert all(torch.equal(a, b) for r, s in zip(renders, ckpt_renders, strict=True) for a, b in zip(r, s, strict=True))
    assert counts.keys() == ckpt_counts.keys() and all(torch.equal(counts[k], ckpt_counts[k]) for k in counts)
    assert int(counts["blocks.0"].sum()) == 48 * 2  # 48 tokens x top-2, each counted once
    assert torch.equal(load, ckpt_load) and int(load.sum()) == 48 * 2


@pytest.mark.distributed
def test_activation_checkpointing_under_expert_parallelism(tmp_path):
    """ep=2, gradient accumulation, both checkpoint modes: the weights, expert biases and ExpertPruning counts of
    a run without checkpointing (the recompute's all-to-alls run in backward on every rank)."""
    run = _scenario("checkpointing", tmp_path, timeout=300)
    plain = torch.load(tmp_path / "ckpt_none.pt", weights_only=True)
    assert plain["blocks.0.router.expert_bias"].abs().sum() > 0
    for mode in ("non_reentrant", "reentrant"):
        assert _max_diff(torch.load(tmp_path / f"ckpt_{mode}.pt", weights_only=True), plain) < 1e-6, mode
        for result in run.results:
            assert result[mode] == result["none"], mode
