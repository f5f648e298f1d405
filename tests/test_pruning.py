"""ExpertPruning (remove little-used experts) and ExpertMagnitudePruning (expert weights only)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoE
from lightning_moe.callbacks.pruning import ExpertMagnitudePruning, ExpertPruning
from lightning_moe.nn import LocalDispatcher
from lightning_moe.nn.experts import GroupedExperts
from lightning_moe.prune import choose_experts, hidden_unit_mask, remap_optimizers, remove_experts

from launch import run_script

DIM = 16
DEAD = (1, 6)  # experts the router never picks in the fit tests


class PruneModel(pl.LightningModule):
    def __init__(self, num_experts: int = 8, top_k: int = 2, activation: str = "gelu", expert: nn.Module | None = None,
                 lr: float = 0.05):
        super().__init__()
        self.moe = MoE(DIM, num_experts, top_k, hidden_dim=32, activation=activation, expert=expert)
        self.head = nn.Linear(DIM, 1)
        self.lr = lr

    def forward(self, x):
        return self.head(x + self.moe(x)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y) + self.moe.aux_loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def kill_experts(model: PruneModel, dead=DEAD) -> None:
    """Feature 0 of the data is a constant 1: a -20 weight on it makes these experts never chosen."""
    with torch.no_grad():
        model.moe.router.gate.weight[list(dead), 0] = -20.0


def loader(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    x[:, 0] = 1.0
    return DataLoader(TensorDataset(x, x[:, 1:4].sum(-1)), batch_size=8)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


# -- choosing and removing experts -----------------------------------------------------------------


def test_choose_experts_by_count_share_top_k_and_multiple():
    counts = torch.tensor([50, 0, 30, 5, 80, 1, 20, 14])
    assert choose_experts(counts, keep=3, min_share=None, top_k=2)[0].tolist() == [0, 2, 4]
    assert choose_experts(counts, keep=0.5, min_share=None, top_k=2)[0].tolist() == [0, 2, 4, 6]
    assert choose_experts(counts, keep=None, min_share=0.05, top_k=2)[0].tolist() == [0, 2, 4, 6, 7]
    assert choose_experts(counts, keep=4, min_share=0.15, top_k=1)[0].tolist() == [0, 2, 4]
    keep, notes = choose_experts(counts, keep=1, min_share=None, top_k=2)
    assert keep.tolist() == [0, 4] and "top_k=2" in notes[0]
    keep, notes = choose_experts(counts, keep=3, min_share=None, top_k=2, multiple_of=2)
    assert keep.tolist() == [0, 2, 4, 6] and "expert_parallel_size=2" in notes[0]


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_remove_experts_equals_routing_that_never_picks_them(router):
    torch.manual_seed(0)
    kwargs = dict(bias_update_rate=1.0) if router == "token_choice" else {}
    layer = MoE(DIM, 8, top_k=2, hidden_dim=32, router=router, **kwargs)
    keep = torch.tensor([0, 2, 3, 5, 7])
    x = torch.randn(40, DIM)
    pruned = copy.deepcopy(layer)
    remove_experts(pruned, keep)

    assert pruned.num_experts == pruned.router.num_experts == pruned.experts.num_experts == 5
    assert pruned.router.gate.weight.shape == (5, DIM) and pruned.router.gate.out_features == 5
    assert pruned.experts.w1.shape == (5, DIM, 32) and pruned.tokens_per_expert.shape == (5,)
    torch.testing.assert_close(pruned.experts.w2, layer.experts.w2[keep])
    torch.testing.assert_close(pruned.router.gate.weight, layer.router.gate.weight[keep])
    y = pruned(x)
    assert y.shape == x.shape and int(pruned.tokens_per_expert.sum()) > 0
    if router == "token_choice":
        # reference: the full layer with the removed experts' selection bias at -inf (weights are
        # renormalised over the chosen top-k, so the softmax over removed experts cancels out)
        with torch.no_grad():
            layer.router.expert_bias.fill_(0.0)
            layer.router.expert_bias[[1, 4, 6]] = -1e9
            pruned.router.expert_bias.fill_(0.0)
        torch.testing.assert_close(pruned(x), layer(x))
        assert layer.tokens_per_expert[[1, 4, 6]].sum() == 0


def test_remove_experts_clamps_top_k_and_refuses_sharded_layers():
    layer = MoE(DIM, 4, top_k=3, hidden_dim=8)
    with pytest.warns(UserWarning, match="top_k is now 2"):
        remove_experts(layer, torch.tensor([0, 3]))
    assert layer.top_k == layer.router.top_k == 2
    assert layer(torch.randn(6, DIM)).shape == (6, DIM)
    sharded = MoE(DIM, 4, top_k=2, hidden_dim=8)
    sharded.experts.num_experts = 2  # what expert parallelism leaves on a rank
    with pytest.raises(ValueError, match="sharded"):
        remove_experts(sharded, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="keep="):
        remove_experts(MoE(DIM, 4, hidden_dim=8), torch.tensor([4]))


def test_template_experts_are_removed_by_module():
    layer = MoE(DIM, 4, top_k=1, expert=nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, DIM)))
    kept_module = layer.experts.experts[2]
    remap = remove_experts(layer, torch.tensor([2, 3]))
    assert layer.experts.num_experts == 2 and layer.experts.experts[0] is kept_module
    assert sum(new is None for _, new, _ in remap.values()) == 8  # two removed experts x 4 tensors
    assert layer(torch.randn(5, DIM)).shape == (5, DIM)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_optimizer_state_follows_the_kept_experts(opt):
    torch.manual_seed(0)
    layer = MoE(DIM, 6, top_k=2, hidden_dim=8)
    optimizer = (torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(layer.parameters(), lr=0.1))
    for _ in range(2):
        optimizer.zero_grad()
        (layer(torch.randn(32, DIM)).pow(2).mean() + layer.aux_loss).backward()
        optimizer.step()
    old_w1 = layer.experts.w1
    old_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[old_w1].items()}
    keep = torch.tensor([1, 4, 5])
    remap_optimizers([optimizer], remove_experts(layer, keep))

    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert any(p is layer.experts.w1 for p in params) and not any(p is old_w1 for p in params)
    assert len(params) == len(list(layer.parameters()))
    assert old_w1 not in optimizer.state
    for key, value in old_state.items():
        new = optimizer.state[layer.experts.w1][key]
        if torch.is_tensor(value) and value.shape == old_w1.shape:
            torch.testing.assert_close(new, value[keep])
        else:
            assert torch.equal(torch.as_tensor(new), torch.as_tensor(value))
    optimizer.zero_grad()
    layer(torch.randn(8, DIM)).sum().backward()
    optimizer.step()  # the rebuilt optimizer steps the smaller parameters


# -- ExpertPruning in a fit ----------------------------------------------------------------------


class CountAndTrace(pl.Callback):
    """Independent count of routed assignments in epoch 0, and weights at the start of epoch 1."""

    def __init__(self):
        self.counts = torch.zeros(8, dtype=torch.long)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.counts += pl_module.moe.tokens_per_expert

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.w1_epoch1 = pl_module.moe.experts.w1.detach().clone()
            self.optimizer_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]


def test_expert_pruning_removes_least_used_experts_and_training_continues():
    torch.manual_seed(0)
    model = PruneModel()
    kill_experts(model)
    pruning, trace = ExpertPruning(keep=4, at_epoch=0), CountAndTrace()
    trainer(callbacks=[pruning, trace]).fit(model, loader())

    assert trace.counts[list(DEAD)].sum() == 0 and trace.counts.sum() == 2 * 64
    expected = sorted(torch.sort(trace.counts, descending=True, stable=True).indices[:4].tolist())
    assert pruning.kept == {"moe": expected}
    assert model.moe.num_experts == model.moe.router.num_experts == model.moe.experts.num_experts == 4
    assert model.moe.router.gate.weight.shape == (4, DIM) and model.moe.router.expert_bias.shape == (4,)
    assert model.moe.experts.w1.shape == (4, DIM, 32)
    # the optimizer trains the new parameters in epoch 1
    assert any(p is model.moe.experts.w1 for p in trace.optimizer_params)
    assert not torch.equal(trace.w1_epoch1, model.moe.experts.w1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_expert_pruning_min_share_drops_dead_experts_and_respects_expert_parallel_size():
    torch.manual_seed(0)
    model = PruneModel()
    kill_experts(model, dead=(1, 6, 7))
    pruning = ExpertPruning(min_share=0.01, at_epoch=0)
    t = trainer(max_epochs=1, callbacks=[pruning])
    t.strategy.expert_parallel_size = 2  # as MoEStrategy reports it (layers unsharded here)
    with pytest.warns(UserWarning, match="multiple of expert_parallel_size=2"):
        t.fit(model, loader())
    # 5 experts are used; the 6th kept (for a multiple of 2) is the lowest-id unused one
    assert pruning.kept == {"moe": [0, 1, 2, 3, 4, 5]} and model.moe.num_experts == 6
    assert model(torch.randn(3, DIM)).shape == (3,)


def test_expert_pruning_arguments():
    with pytest.raises(ValueError, match="keep="):
        ExpertPruning()
    with pytest.raises(ValueError, match="keep=0"):
        ExpertPruning(keep=0)
    with pytest.raises(ValueError, match="keep=1.5"):
        ExpertPruning(keep=1.5)
    with pytest.raises(ValueError, match="min_share"):
        ExpertPruning(min_share=1.0)
    with pytest.raises(ValueError, match="at_epoch"):
        ExpertPruning(keep=2, at_epoch=-1)


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_pruning_under_ddp_agrees_on_global_counts_and_rewraps(tmp_path):
    """2 gloo processes, different data: both prune the same experts (counts summed) and stay in sync."""
    ranks = run_script("pruning.py", "ddp", out=tmp_path, ranks=2).results
    total = torch.tensor(ranks[0]["counts"]) + torch.tensor(ranks[1]["counts"])
    expected = sorted(torch.sort(total, descending=True, stable=True).indices[:3].tolist())
    assert ranks[0]["kept"] == ranks[1]["kept"] == expected
    # DDP kept averaging gradients after the re-wrap: identical weights on both ranks
    assert ranks[0]["gate"] == pytest.approx(ranks[1]["gate"], abs=1e-6)
    assert ranks[0]["w1"] == pytest.approx(ranks[1]["w1"], abs=1e-6)


# -- ExpertMagnitudePruning --------------------------------------------------------------------------


def _zero_fraction(t: torch.Tensor) -> float:
    return (t == 0).float().mean().item()


def test_magnitude_pruning_unstructured_touches_expert_weights_only(tmp_path):
    torch.manual_seed(0)
    model = PruneModel(activation="swiglu", lr=0.0)
    dense_before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" not in n}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    pruning = ExpertMagnitudePruning(amount=0.5)
    trainer(max_epochs=1, callbacks=[pruning, checkpoint], enable_checkpointing=True).fit(model, loader())

    bank = model.moe.experts
    assert set(n for n, _ in bank.named_parameters()) == {"w1", "w2", "w3"}  # permanent at train end
    zeros = sum((getattr(bank, w) == 0).sum().item() for w in ("w1", "w2", "w3"))
    assert zeros == round(0.5 * 3 * 8 * DIM * 32)
    for n, p in model.named_parameters():
        if n in dense_before:
            torch.testing.assert_close(p, dense_before[n])  # lr=0: dense weights unchanged, none pruned
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert _zero_fraction(torch.cat([state[f"moe.experts.{w}"].flatten() for w in ("w1", "w2", "w3")])) == 0.5


def test_magnitude_pruning_structured_prunes_hidden_units_per_expert():
    torch.manual_seed(0)
    model = PruneModel(activation="swiglu")
    pruning = ExpertMagnitudePruning(amount=0.25, structured=True, make_pruning_permanent=False)
    trainer(max_epochs=2, callbacks=[pruning]).fit(model, loader())
    bank = model.moe.experts
    mask_EH = bank.w1_mask[:, 0, :]
    # two pruning events: 8 of 32, then 6 of the 24 left -> 14 hidden units per expert
    assert (mask_EH == 0).sum(-1).tolist() == [14] * 8
    torch.testing.assert_close(bank.w1_mask, mask_EH[:, None, :].expand_as(bank.w1_mask))
    torch.testing.assert_close(bank.w3_mask, bank.w1_mask)
    torch.testing.assert_close(bank.w2_mask, mask_EH[:, :, None].expand_as(bank.w2_mask))
    assert len({tuple(row.tolist()) for row in mask_EH}) > 1  # each expert chose its own units
    x = torch.randn(5, DIM)
    with torch.no_grad():
        h = x @ bank.w1[0]
        assert (h[:, mask_EH[0] == 0] == 0).all()
    assert model(x).shape == (5,)


def test_hidden_unit_mask_keeps_pruned_units_pruned_and_picks_smallest():
    bank = GroupedExperts(2, 4, 6, "relu")
    with torch.no_grad():
        bank.w1.copy_(torch.arange(6.0).expand(2, 4, 6))
        bank.w2.copy_(torch.arange(6.0)[:, None].expand(2, 6, 4))
        bank.w1[1] = bank.w1[1].flip(-1)
        bank.w2[1] = bank.w2[1].flip(0)
    mask = hidden_unit_mask(bank, 0.5)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert hidden_unit_mask(bank, 2).sum(-1).tolist() == [4, 4]


def test_checkpoint_keeps_the_strategy_state_dict_and_folds_masks(tmp_path):
    """A strategy that gathers the full logical model puts more in the state dict than the local module has."""
    torch.manual_seed(0)

    class GatheringStrategy(SingleDeviceStrategy):
        def lightning_module_state_dict(self):
            state = super().lightning_module_state_dict()
            state["gathered.from_other_ranks"] = torch.ones(3)
            return state

    def saved(callback):
        model = PruneModel()
        t = trainer(max_epochs=1, strategy=GatheringStrategy(torch.device("cpu")), callbacks=[callback])
        t.fit(model, loader())
        t.save_checkpoint(tmp_path / "x.ckpt")
        return torch.load(tmp_path / "x.ckpt", weights_only=False)["state_dict"]

    ours = ExpertMagnitudePruning(amount=0.5, make_pruning_permanent=True)
    ours.on_train_end = lambda *args: None  # save while the masks are still in place
    state = saved(ours)
    assert "gathered.from_other_ranks" in state
    assert "moe.experts.w1" in state and "moe.experts.w1_orig" not in state and "moe.experts.w1_mask" not in state
    assert 0.3 < _zero_fraction(state["moe.experts.w1"]) < 0.7
    # Lightning's ModelPruning replaces the whole state dict with the local module's
    theirs = ModelPruning("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=False)
    theirs.on_train_end = lambda *args: None
    assert "gathered.from_other_ranks" not in saved(theirs)


def test_magnitude_pruning_binds_parameters_after_strategy_setup():
    """A sharding strategy keeps half the template experts in strategy.setup (after the setup hooks)."""
    torch.manual_seed(0)

    class FirstTwoExperts(LocalDispatcher):  # experts 2 and 3 are dead: every row goes to 0 or 1
        def plan(self, kept_counts_E, host_counts=None):
            return super().plan(kept_counts_E[:2])

    class HalvingStrategy(SingleDeviceStrategy):
        def setup(self, trainer):
            bank = self.lightning_module.moe.experts
            bank.experts = nn.ModuleList(list(bank.experts)[:2])
            bank.num_experts = 2
            self.lightning_module.moe.expert_dispatcher = FirstTwoExperts()
            super().setup(trainer)

    template = nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, DIM))
    model = PruneModel(num_experts=4, top_k=1, expert=template)
    removed = list(model.moe.experts.experts)[2:]
    kill_experts(model, dead=(2, 3))
    pruning = ExpertMagnitudePruning(amount=0.5, make_pruning_permanent=False)
    trainer(max_epochs=1, strategy=HalvingStrategy(torch.device("cpu")), callbacks=[pruning]).fit(model, loader())
    bound = {id(m) for m, _ in pruning._parameters_to_prune}
    assert len(bound) == 4  # two Linear layers of each of the 2 local experts
    assert all(hasattr(m, "weight_mask") for m, _ in pruning._parameters_to_prune)
    assert not any(hasattr(m, "weight_mask") for expert in removed for m in expert.modules())


@pytest.mark.distributed
@pytest.mark.slow
def test_pruning_under_expert_parallelism(tmp_path):
    """strategy="moe", 2 processes, 4 of 8 experts each. Magnitude pruning: the checkpoint holds all 8 experts,
    masks folded in. ExpertPruning keep=3 -> 4 (a multiple of 2): experts gathered, pruned, sharded again
    (2 per rank), training continues, and the model holds exactly the kept experts."""
    ranks = run_script("pruning.py", "ep", out=tmp_path, ranks=2).results
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert state["moe.experts.w1"].shape == (8, DIM, 32) and state["moe.experts.w2"].shape == (8, 32, DIM)
    zeros = sum(int((state[f"moe.experts.{w}"] == 0).sum()) for w in ("w1", "w2"))
    assert zeros == 8 * DIM * 32  # each rank pruned half of its own experts' weights

    total = torch.tensor(ranks[0]["counts"]) + torch.tensor(ranks[1]["counts"])
    expected = sorted(torch.sort(total, descending=True, stable=True).indices[:4].tolist())
    assert not set(DEAD) & set(expected)
    for result in ranks:
        assert result["kept"] == expected and result["num_experts"] == 4
        assert result["local_w1"] == [2, DIM, 32]  # epoch 1 trained 2 experts per rank
        assert result["w1_full"] == [4, DIM, 32]  # gathered back at the end of fit
        assert result["w1_ok"] and result["gate_ok"]
    # optimizer state followed the experts across ranks: rank r now holds kept experts 2r, 2r+1
    momentum_full = ranks[0]["momentum_before"] + ranks[1]["momentum_before"]  # 8 experts, in rank order
    assert any(any(row) for row in momentum_full)
    for r, result in enumerate(ranks):
        assert result["momentum_after"] == [momentum_full[g] for g in expected[2 * r:2 * r + 2]]
