"""Loss scopes of the balancing loss and the z-loss: "global", "local" and "sequence".

Units run W simulated ranks one after another in this process, with a :class:`Recorded` count reduction (pass 1
records each rank's counts, pass 2 hands every rank their sum): the mean of the W per-rank losses, and of their
gradients, must equal the single-process loss on the whole batch. The multi-process tests train with MoEStrategy on
2 and 4 gloo ranks (``tests/scripts/balance_train.py``) against one process on the same global batches
(``tests/scripts/balance_models.py``), with the default coefficients (aux 1e-2, z 1e-3) and AdamW(eps=1e-3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe import MoE
from lightning_moe.nn import CountReduction, LocalCountReduction
from lightning_moe.nn import functional as MF

from launch import run_script

sys.path.insert(0, str(Path(__file__).parent / "scripts"))

from balance_models import Net, reference_train  # noqa: E402
from ep_models import Model  # noqa: E402
from ep_models import reference_train as ep_reference_train  # noqa: E402

TOL = 1e-5


class Recorded:
    """A :class:`CountReduction` over ``size`` simulated ranks that run one after another in this process.

    Pass 1 (``total`` None) records what each rank sends and hands it back; pass 2 hands every rank the sum.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: list[torch.Tensor] = []
        self.total: torch.Tensor | None = None

    def start(self, counts_X: torch.Tensor) -> torch.Tensor:
        if self.total is None:
            self.seen.append(counts_X.clone())
            return counts_X
        return self.total.clone()

    def wait(self, pending_X: torch.Tensor) -> torch.Tensor:
        return pending_X


class Refusing(Recorded):
    def start(self, counts_X: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the layer reduced counts where its losses must be this rank's own")


def _batch(shape=(5, 6), padded=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 8, generator=g)
    mask = torch.rand(*shape, generator=g) < 0.4 if padded else torch.zeros(shape, dtype=torch.bool)
    if padded:
        mask[1] = True  # a sequence of padding only
    return x, mask


def _losses_and_grads(layer: MoE, x, mask):
    layer.zero_grad()
    layer(x, padding_mask=mask)
    losses = torch.stack([layer.load_balancing_loss, layer.z_loss])
    losses.sum().backward()
    return losses.detach(), layer.router.gate.weight.grad.clone()


def _simulated_ranks(layer: MoE, x, mask, bounds):
    """Mean over simulated ranks (rows ``bounds[r]:bounds[r+1]`` of the batch) of losses and router gradients."""
    reduction = Recorded(len(bounds) - 1)
    layer.count_reduction = reduction
    parts = [(x[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for part in parts:
        layer(*part)
    reduction.total = torch.stack(reduction.seen).sum(dim=0)
    results = [_losses_and_grads(layer, *part) for part in parts]
    layer.count_reduction = None
    W = len(parts)
    return sum(r[0] for r in results) / W, sum(r[1] for r in results) / W, reduction.total


@pytest.mark.parametrize("scope", ["global", "sequence"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_mean_of_rank_losses_is_the_whole_batch_loss(scope, score_func):
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=16, score_func=score_func, aux_loss_scope=scope)
    x, mask = _batch()
    whole = _losses_and_grads(layer, x, mask)  # one process: no reduction installed
    # Uneven ranks (1, 3 and 1 sequences; the second holds the fully padded one): the W-scaled form is exact anyway.
    mean_loss, mean_grad, total = _simulated_ranks(layer, x, mask, [0, 1, 4, 5])
    torch.testing.assert_close(mean_loss, whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean_grad, whole[1], rtol=1e-5, atol=1e-7)
    # The vector the ranks summed: counts of the whole batch, its routed tokens, its routed sequences (sequence scope).
    layer(x, padding_mask=mask)
    assert total[:4].tolist() == layer.tokens_per_expert.tolist()
    assert int(total[4]) == int((~mask).sum())
    assert int(total[5]) == (4 if scope == "sequence" else 0)


def test_local_scope_mean_of_rank_losses_differs_from_the_whole_batch_loss():
    # What the global scope fixes: per-rank means weigh a mostly padded rank like a full one.
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=16, aux_loss_scope="local")
    x, mask = _batch()
    whole, _ = _losses_and_grads(layer, x, mask)
    parts = [_losses_and_grads(layer, x[a:b], mask[a:b])[0] for a, b in ((0, 1), (1, 4), (4, 5))]
    assert ((sum(parts) / 3 - whole).abs() / whole).max() > 0.05


def test_expert_choice_z_loss_is_a_global_token_mean():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=16, router="expert_choice")
    x, mask = _batch()
    whole = _losses_and_grads(layer, x, mask)
    mean_loss, mean_grad, _ = _simulated_ranks(layer, x, mask, [0, 2, 5])
    assert float(whole[0][0]) == 0.0 and float(mean_loss[0]) == 0.0  # no balancing loss: balanced by construction
    torch.testing.assert_close(mean_loss, whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean_grad, whole[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 4)])
@pytest.mark.parametrize("score_func,top_k", [("softmax", 2), ("softmax", 1), ("sigmoid", 2)])
def test_sequence_scope_matches_a_per_sequence_loop(shape, score_func, top_k):
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=top_k, hidden_dim=16, score_func=score_func, aux_loss_scope="sequence")
    x, mask = _batch(shape)
    x.requires_grad_(True)
    layer(x, padding_mask=mask)
    loss = layer.load_balancing_loss
    grad_w, grad_x = torch.autograd.grad(loss, [layer.router.gate.weight, x])
    # Reference: each sequence alone through the same layer with the batch-level ("local") loss; mean over the
    # sequences that have a routed token (dropless token choice routes every token as in the batch).
    layer.aux_loss_scope = "local"
    seqs_x, seqs_mask = x.reshape(-1, shape[-1], 8), mask.reshape(-1, shape[-1])
    per_sequence = []
    for b in range(seqs_x.shape[0]):
        if seqs_mask[b].all():
            continue
        layer(seqs_x[b], padding_mask=seqs_mask[b])
        per_sequence.append(layer.load_balancing_loss)
    expected = torch.stack(per_sequence).mean()
    ref_w, ref_x = torch.autograd.grad(expected, [layer.router.gate.weight, x])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected, _batch_level_loss(layer, x, mask))  # the sequence loss is not the batch's


def _batch_level_loss(layer: MoE, x, mask):
    layer(x, padding_mask=mask)
    return layer.load_balancing_loss


def test_sequence_scope_z_loss_is_the_token_mean():
    torch.manual_seed(0)
    layer = MoE(8, 4, hidden_dim=16, aux_loss_scope="sequence")
    x, mask = _batch()
    layer(x, padding_mask=mask)
    z = layer.z_loss
    layer.aux_loss_scope = "local"
    layer(x, padding_mask=mask)
    torch.testing.assert_close(z, layer.z_loss, rtol=0, atol=0)


def test_functional_sequence_loss_of_one_sequence_is_the_batch_loss():
    g = torch.Generator().manual_seed(3)
    probs_SE = torch.softmax(torch.randn(7, 5, generator=g), dim=-1)
    valid_S = torch.tensor([True, True, False, True, True, False, True])
    top_ids_SK, _ = MF.topk_routing(probs_SE, 2, valid_T=valid_S)
    counts_E = torch.bincount(top_ids_SK.reshape(-1), minlength=6)[:5]
    batch = MF.load_balancing_loss(probs_SE, counts_E, int(valid_S.sum()), 2, valid_S)
    sequence = MF.sequence_load_balancing_loss(probs_SE[None], top_ids_SK[None], valid_S[None])
    torch.testing.assert_close(sequence, batch)
    # An explicit divisor (the global number of sequences) scales the sum; no routed sequence gives 0.
    torch.testing.assert_close(MF.sequence_load_balancing_loss(probs_SE[None], top_ids_SK[None], valid_S[None], 4),
                               batch / 4)
    empty = MF.sequence_load_balancing_loss(probs_SE[None], top_ids_SK[None], torch.zeros(1, 7, dtype=torch.bool))
    assert float(empty) == 0.0


@pytest.mark.parametrize("padded", [False, True])
def test_global_scope_alone_is_exactly_local(padded):
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=16)
    assert layer.aux_loss_scope == "global" and isinstance(layer.count_reduction, LocalCountReduction)
    x, mask = _batch(padded=padded)
    global_ = _losses_and_grads(layer, x, mask)
    layer.aux_loss_scope = "local"
    local = _losses_and_grads(layer, x, mask)
    assert torch.equal(global_[0], local[0]) and torch.equal(global_[1], local[1])
    assert torch.equal(layer.global_tokens_per_expert, layer.tokens_per_expert) and layer.reduced_over == 1


def test_training_forward_records_the_summed_counts():
    torch.manual_seed(0)
    layer = MoE(8, 4, top_k=2, hidden_dim=16)
    x, mask = _batch()
    _, _, total = _simulated_ranks(layer, x, mask, [0, 2, 5])
    layer.count_reduction = reduction = Recorded(2)
    reduction.total = total
    layer(x[:2], padding_mask=mask[:2])
    assert layer.global_tokens_per_expert.tolist() == total[:4].tolist() and layer.reduced_over == 2
    assert layer.tokens_per_expert.sum() < layer.global_tokens_per_expert.sum()


def test_eval_mode_local_scope_and_unused_losses_reduce_nothing():
    layer = MoE(8, 4, hidden_dim=16)
    layer.count_reduction = Refusing(2)
    x, mask = _batch()
    layer.eval()(x, padding_mask=mask)  # evaluation never waits for peers
    assert layer.reduced_over == 1
    silent = MoE(8, 4, hidden_dim=16, aux_loss_coef=0.0, z_loss_coef=0.0)  # nothing uses the sums
    silent.count_reduction = Refusing(2)
    silent(x, padding_mask=mask)
    assert float(silent.aux_loss.detach()) == 0.0
    layer.train()
    layer.aux_loss_scope = "local"
    layer(x, padding_mask=mask)
    with pytest.raises(AssertionError, match="reduced counts"):
        layer.aux_loss_scope = "global"
        layer(x, padding_mask=mask)


def test_scope_and_reduction_are_validated():
    with pytest.raises(ValueError, match="aux_loss_scope='batch' must be one of"):
        MoE(8, 4, aux_loss_scope="batch")
    with pytest.raises(ValueError, match="aux_loss_scope='sequence' needs router='token_choice'"):
        MoE(8, 4, router="expert_choice", aux_loss_scope="sequence")
    layer = MoE(8, 4)
    with pytest.raises(ValueError, match="must implement the CountReduction protocol"):
        layer.count_reduction = object()
    layer.count_reduction = Recorded(3)
    assert isinstance(layer.count_reduction, CountReduction) and layer.count_reduction.size == 3
    layer.count_reduction = None
    assert isinstance(layer.count_reduction, LocalCountReduction)


# -- N gloo ranks vs one process -----------------------------------------------------------------------------------

RUNS_2 = [
    dict(name="global_ep2", ep=2, scope="global", padding=False),
    dict(name="global_ep1", ep=1, scope="global", padding=False),
    dict(name="global_ep2_padded", ep=2, scope="global", padding=True),
    dict(name="global_ep1_padded", ep=1, scope="global", padding=True),
    dict(name="global_ep2_padded_bias", ep=2, scope="global", padding=True, bias=0.05),
    dict(name="global_ep2_padded_accumulate", ep=2, scope="global", padding=True, accumulate=2),
    dict(name="sequence_ep2_padded", ep=2, scope="sequence", padding=True),
    dict(name="local_ep2", ep=2, scope="local", padding=False),
    dict(name="local_ep1_padded_bias", ep=1, scope="local", padding=True, bias=0.05),
]
RUNS_4 = [  # data 2 x expert 2
    dict(name="global_w4", ep=2, scope="global", padding=False),
    dict(name="global_w4_padded_bias", ep=2, scope="global", padding=True, bias=0.05),
    dict(name="local_w4_padded_bias", ep=2, scope="local", padding=True, bias=0.05),
]


def _reference(run: dict) -> dict:
    scope = "global" if run["scope"] == "local" else run["scope"]  # "local" is measured against the global reference
    net = reference_train(scope, run["padding"], run.get("bias", 0.0), accumulate=run.get("accumulate", 1))
    return net.state_dict()


def _max_diff(state: dict, reference: dict) -> float:
    assert set(state) == set(reference), set(state) ^ set(reference)
    return max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())


def _train(tmp_path: Path, devices: int, runs: list[dict], timeout: float) -> tuple[Path, dict]:
    run = run_script("balance_train.py", json.dumps({"devices": devices, "runs": runs}), out=tmp_path, ranks=devices,
                     timeout=timeout)
    assert all(result == run.results[0] for result in run.results)  # every rank observed the same
    return tmp_path, run.results[0]


def _check_runs(out: Path, results: dict, runs: list[dict], world: int) -> None:
    for run in runs:
        state = torch.load(out / f"{run['name']}.pt", weights_only=True)
        diff = _max_diff(state, _reference(run))
        if run["scope"] == "local":
            assert diff > 1e-4, (run["name"], diff)  # the equivalence check can fail: per-rank losses differ
        else:
            assert diff < TOL, (run["name"], diff)
        observed = results[run["name"]]
        assert observed["reduced_over"] == ([1, 1] if run["scope"] == "local" else [world, world]), run["name"]
        assert observed["removed_after_fit"] is True
        if run.get("bias"):
            # Bias balancing takes the counts the loss already summed: no all-reduce of its own, unless "local".
            assert (observed["module_all_reduces"] > 0) == (run["scope"] == "local"), (run["name"], observed)
    # The comparison can fail: training moved the model away from its initial weights.
    torch.manual_seed(0)
    assert _max_diff(Net().state_dict(), _reference(runs[0])) > 1e-2


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("balance2"), 2, RUNS_2, timeout=420)


@pytest.mark.distributed
def test_two_ranks_global_and_sequence_scopes_match_one_process(two_ranks):
    _check_runs(*two_ranks, RUNS_2, world=2)


@pytest.mark.distributed
def test_a_layer_with_an_installed_reduction_deep_copies(two_ranks):
    _, results = two_ranks
    assert results["global_ep1"]["deepcopy"] == "ok"  # a copied layer sums over the same group


@pytest.mark.distributed
@pytest.mark.slow
def test_four_ranks_data2_x_expert2_match_one_process(tmp_path):
    _check_runs(*_train(tmp_path, 4, RUNS_4, timeout=540), RUNS_4, world=4)


@pytest.mark.distributed
def test_strategy_equivalence_with_default_coefficients(tmp_path):
    # tests/scripts/ep_train.py's equivalence (SGD, 5 steps) with the default aux/z coefficients and scope.
    run_script("ep_train.py", "aux", str(tmp_path), out=tmp_path, ranks=0, timeout=300)
    expected = ep_reference_train(aux_losses=True).state_dict()
    for ep in (2, 1):
        assert _max_diff(torch.load(tmp_path / f"aux_ep{ep}.pt", weights_only=True), expected) < TOL, ep
    # The losses are on and matter: without them training ends elsewhere.
    assert _max_diff(ep_reference_train().state_dict(), expected) > 1e-4
    assert Model(aux_losses=True).net.moe1.aux_loss_coef == 1e-2


def test_pruned_layer_records_global_counts_of_its_new_size():
    from lightning_moe.prune import remove_experts

    layer = MoE(8, 4, top_k=2, hidden_dim=16)
    remove_experts(layer, torch.tensor([0, 2, 3]))
    x, mask = _batch()
    layer(x, padding_mask=mask)
    assert layer.global_tokens_per_expert.shape == (3,)
    assert torch.equal(layer.global_tokens_per_expert, layer.tokens_per_expert)
