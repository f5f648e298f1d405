"""Sparse upcycling: exact conversion per target kind, torch's fast path not bypassed, training, the report."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_moe as lmoe
from lightning_moe.nn import GroupedExperts, TemplateExperts
from lightning_moe.upcycle import MoETransformerDecoderLayer, MoETransformerEncoderLayer, UpcycleReport, upcycle

D = 16


def _moes(model):
    return [m for m in model.modules() if isinstance(m, lmoe.MoE)]


def _assert_exact(model, run, atol=1e-5):
    """Outputs of ``run(model)`` before and after upcycling agree in eval mode; the MoE ran."""
    model.eval()
    with torch.no_grad():
        before = run(model)
    report = upcycle(model, num_experts=4, top_k=2)
    assert isinstance(report, UpcycleReport) and report.exact and report.converted
    model.eval()
    with torch.no_grad():
        after = run(model)
    torch.testing.assert_close(after, before, atol=atol, rtol=1e-5)
    for moe in _moes(model):
        assert int(moe.tokens_per_expert.sum()) > 0, "the MoE layer did not run"
    return report


# --- torch Transformer layers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_first=True),
        dict(batch_first=False, activation="gelu"),
        dict(batch_first=True, norm_first=True, activation=F.gelu),
        dict(batch_first=True, activation=nn.ReLU()),
        dict(batch_first=True, bias=False),
    ],
    ids=["relu", "gelu-str-seq-first", "gelu-fn-norm-first", "relu-module", "no-bias"],
)
def test_encoder_layer_is_exact(kwargs):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=40, dropout=0.1, **kwargs)
    x = torch.randn(3, 5, D)
    report = _assert_exact(layer, lambda m: m(x))
    assert type(layer) is MoETransformerEncoderLayer
    assert not hasattr(layer, "linear1") and not hasattr(layer, "linear2")
    (info,) = report.converted
    assert (info.kind, info.dim, info.hidden_dim) == ("encoder_layer", D, 40)
    assert any("dropout p=[0.1]" in note for note in report.notes)  # the inner dropout is not carried over
    assert (layer.moe.experts.b1 is not None) == kwargs.get("bias", True)
    # Every expert holds the dense weights: w1[e] is linear1.weight.T for all e.
    w1 = layer.moe.experts.w1
    assert torch.equal(w1[0], w1[3])


def test_decoder_layer_is_exact():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, 4, dim_feedforward=24, batch_first=True, activation="gelu")
    tgt, memory = torch.randn(2, 6, D), torch.randn(2, 4, D)
    report = _assert_exact(layer, lambda m: m(tgt, memory))
    assert type(layer) is MoETransformerDecoderLayer
    assert report.converted[0].kind == "decoder_layer" and report.converted[0].activation == "gelu"


def test_full_transformer_is_exact_and_converts_every_layer():
    torch.manual_seed(0)
    model = nn.Transformer(D, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, batch_first=True)
    src, tgt = torch.randn(2, 7, D), torch.randn(2, 5, D)
    report = _assert_exact(model, lambda m: m(src, tgt))
    assert [m.name for m in report.converted] == [
        "encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
    assert report.params_after > report.params_before


def test_custom_activation_becomes_template_experts_and_stays_exact():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=24, batch_first=True, activation=torch.tanh)
    x = torch.randn(2, 3, D)
    report = _assert_exact(layer, lambda m: m(x))
    assert report.converted[0].activation is None
    assert isinstance(layer.moe.experts, TemplateExperts)


def test_user_subclass_of_encoder_layer_keeps_its_methods():
    class Tagged(nn.TransformerEncoderLayer):
        def extra(self):
            return "mine"

    torch.manual_seed(0)
    layer = Tagged(D, 2, dim_feedforward=24, batch_first=True)
    x = torch.randn(2, 3, D)
    _assert_exact(layer, lambda m: m(x))
    assert isinstance(layer, Tagged) and layer.extra() == "mine" and hasattr(layer, "moe")


def test_fast_path_does_not_bypass_the_moe(monkeypatch):
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        dense = layer(x)
    assert calls, "precondition: the dense layer takes torch's fused fast path in eval + no_grad"
    upcycle(layer, num_experts=4)
    layer.eval()
    calls.clear()
    with torch.no_grad():
        moe_out = layer(x)
    assert not calls
    assert layer.moe.tokens_per_expert.tolist() != [0, 0, 0, 0]
    assert int(layer.moe.tokens_per_expert.sum()) == 2 * 5 * 2
    torch.testing.assert_close(moe_out, dense, atol=1e-5, rtol=1e-5)


def test_encoder_with_padding_mask_skips_nested_tensors():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 32, batch_first=True), 2).eval()
    assert encoder.use_nested_tensor  # precondition: eval + padding mask would take the nested-tensor path
    x = torch.randn(3, 6, D)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = encoder(x, src_key_padding_mask=mask)
    upcycle(encoder, num_experts=4)
    assert not encoder.use_nested_tensor
    with torch.no_grad():
        moe_out = encoder(x, src_key_padding_mask=mask)
    torch.testing.assert_close(moe_out[~mask], dense[~mask], atol=1e-5, rtol=1e-5)


# --- MLP modules ---------------------------------------------------------------------------------------


class FcMLP(nn.Module):
    """GELU applied in forward (no activation module): upcycle finds it with a probe."""

    def __init__(self, names=("fc1", "fc2"), hidden=48):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(D, hidden))
        setattr(self, names[1], nn.Linear(hidden, D))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(getattr(self, self.names[1])(F.gelu(getattr(self, self.names[0])(x))))


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LlamaMLP(nn.Module):
    def __init__(self, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        for name, shape in zip(names, [(D, 40), (D, 40), (40, D)], strict=True):
            setattr(self, name, nn.Linear(*shape, bias=False))
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class Block(nn.Module):
    def __init__(self, mlp_name, mlp):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        setattr(self, mlp_name, mlp)
        self.mlp_name = mlp_name

    def forward(self, x):
        return x + getattr(self, self.mlp_name)(self.norm(x))


@pytest.mark.parametrize(
    "mlp_name, make, activation",
    [
        ("mlp", lambda: FcMLP(), "gelu"),
        ("ffn", lambda: FcMLP(("c_fc", "c_proj")), "gelu"),
        ("feed_forward", lambda: ReluMLP(), "relu"),
        ("mlp", lambda: nn.Sequential(nn.Linear(D, 24), nn.SiLU(), nn.Dropout(0.1), nn.Linear(24, D)), "silu"),
    ],
    ids=["fc1-fc2-probed-gelu", "c_fc-c_proj", "relu-module", "sequential"],
)
def test_mlp_becomes_stacked_experts_exactly(mlp_name, make, activation):
    torch.manual_seed(0)
    model = nn.Sequential(Block(mlp_name, make()), Block(mlp_name, make()))
    x = torch.randn(2, 5, D)
    report = _assert_exact(model, lambda m: m(x))
    assert [(m.name, m.kind, m.activation) for m in report.converted] == [
        (f"0.{mlp_name}", "mlp", activation), (f"1.{mlp_name}", "mlp", activation)]
    assert all(isinstance(getattr(block, mlp_name), lmoe.MoE) for block in model)
    assert all(isinstance(moe.experts, GroupedExperts) and moe.experts.b1 is not None for moe in _moes(model))


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_swiglu_mlp_becomes_stacked_experts_exactly(names):
    torch.manual_seed(0)
    model = Block("mlp", LlamaMLP(names))
    x = torch.randn(2, 5, D)
    report = _assert_exact(model, lambda m: m(x))
    assert report.converted[0].kind == "swiglu_mlp"
    experts = model.mlp.experts
    assert experts.activation == "swiglu" and experts.w3 is not None and experts.b1 is None
    gate = LlamaMLP(names)  # shapes only: the stacked layout is w1 = gate.T, w3 = up.T, w2 = down.T
    assert experts.w1.shape[1:] == gate.get_submodule(names[0]).weight.t().shape


# --- generic targets --------------------------------------------------------------------------------


class Odd(nn.Module):
    """No recognised structure: becomes template experts (copies, not re-initialised)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 20)
        self.b = nn.Linear(20, D)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * 0.5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(D), Odd()) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize(
    "target",
    [Odd, "blocks.*.1", re.compile(r"blocks\.\d+\.1"), lambda name, module: isinstance(module, Odd)],
    ids=["type", "fnmatch", "regex", "predicate"],
)
def test_generic_target_becomes_template_experts_exactly(target):
    torch.manual_seed(0)
    model = Net().eval()
    dense_a = model.blocks[0][1].a.weight.detach().clone()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        before = model(x)
    report = upcycle(model, num_experts=3, top_k=2, target=target)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert [(m.name, m.kind) for m in report.converted] == [("blocks.0.1", "template"), ("blocks.1.1", "template")]
    experts = model.blocks[0][1].experts
    assert isinstance(experts, TemplateExperts) and len(experts.experts) == 3
    assert all(torch.equal(e.a.weight, dense_a) for e in experts.experts)


def test_report_lists_what_it_cannot_convert():
    class TwoArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, D)

        def forward(self, x, scale):
            return self.proj(x) * scale

    class OwnFF(nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return self.dropout2(self.linear2(torch.tanh(self.linear1(x))))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = TwoArgs()
            self.ffn = nn.ModuleDict({"gate": nn.ReLU()})  # no parameters, no width
            self.layer = OwnFF(D, 2, 32, batch_first=True)
            self.feed_forward = ReluMLP()

    model = Model()
    report = upcycle(model, num_experts=2)
    assert [m.name for m in report.converted] == ["feed_forward"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"mlp", "ffn", "layer"}
    assert "single tensor argument" in reasons["mlp"]
    assert "width" in reasons["ffn"]
    assert "_ff_block" in reasons["layer"]
    assert "skipped mlp" in str(report)
    assert isinstance(model.mlp, TwoArgs)  # left dense


def test_upcycled_layers_and_root_mlp_are_skipped():
    layer = nn.TransformerEncoderLayer(D, 2, 32, batch_first=True)
    upcycle(layer, num_experts=2)
    with pytest.warns(UserWarning, match="no feed-forward block"):
        again = upcycle(layer, num_experts=2, target=nn.TransformerEncoderLayer)
    assert again.skipped[0].reason.startswith("already upcycled")
    with pytest.warns(UserWarning, match="no feed-forward block"):
        root = upcycle(ReluMLP(), num_experts=2, target=ReluMLP)
    assert "root module" in root.skipped[0].reason


# --- options ------------------------------------------------------------------------------------------


def test_top1_warns_and_is_not_exact():
    layer = nn.TransformerEncoderLayer(D, 2, 32, batch_first=True)
    with pytest.warns(UserWarning, match="top_k=1"):
        report = upcycle(layer, num_experts=4, top_k=1)
    assert not report.exact and any("top_k=1" in n for n in report.notes)


def test_noise_makes_experts_differ():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 32, batch_first=True)
    dense_w1 = layer.linear1.weight.detach().t().clone()
    report = upcycle(layer, num_experts=4, noise=0.01)
    w1 = layer.moe.experts.w1.detach()
    assert not report.exact and not torch.equal(w1[0], w1[1])
    rel = (w1 - dense_w1).norm() / (dense_w1.norm() * 2)  # 4 experts -> sqrt(4) copies
    assert 0.001 < rel < 0.05


def test_shared_experts_start_silent_and_moe_kwargs_pass_through():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, 32, batch_first=True)
    x = torch.randn(2, 5, D)
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    report = upcycle(layer, num_experts=4, num_shared_experts=1, score_func="sigmoid", aux_loss_coef=0.05)
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert report.exact and layer.moe.score_func == "sigmoid" and layer.moe.aux_loss_coef == 0.05
    assert layer.moe.shared_experts is not None
    assert report.converted[0].active_params < report.converted[0].params_after


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(num_experts=2, noise=-1.0), "noise"),
        (dict(num_experts=2, activation="relu"), "taken from the dense block"),
        (dict(num_experts=2, target=3), "target"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upcycle(nn.TransformerEncoderLayer(D, 2, 32), **kwargs)


def test_state_dict_and_pickle_round_trip():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 32, batch_first=True), 2)
    upcycle(model, num_experts=4, noise=0.01)
    assert "layers.0.moe.experts.w1" in model.state_dict() and "layers.0.linear1.weight" not in model.state_dict()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    x = torch.randn(2, 3, D)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    other = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 32, batch_first=True), 2)
    upcycle(other, num_experts=4)
    other.load_state_dict(model.state_dict())
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


# --- training -----------------------------------------------------------------------------------------


def test_upcycled_model_trains_and_its_loss_falls():
    torch.manual_seed(0)
    vocab, seq = 12, 8
    embed = nn.Embedding(vocab, D)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True), 2)
    head = nn.Linear(D, vocab)
    model = nn.ModuleDict({"embed": embed, "encoder": encoder, "head": head})
    upcycle(model, num_experts=4, top_k=2, noise=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Task: copy the token at position t-1 (needs attention, learnable in a few dozen steps).
    data = torch.randint(0, vocab, (64, seq))
    losses = []
    for step in range(60):
        batch = data[(step * 16) % 64:(step * 16) % 64 + 16]
        logits = model["head"](model["encoder"](model["embed"](batch)))
        task = F.cross_entropy(logits[:, 1:].reshape(-1, vocab), batch[:, :-1].reshape(-1))
        loss = task + sum(m.aux_loss for m in model.modules() if isinstance(m, lmoe.MoE))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(task.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    experts = model["encoder"].layers[0].moe.experts
    assert experts.w1.grad is not None and experts.w1.grad.abs().sum() > 0
    assert model["encoder"].layers[0].moe.router.gate.weight.grad.abs().sum() > 0
