"""The package transformer: planner-exact parameter counts, causality, options, and what it refuses to build."""

import pytest
import torch

import lightning_moe as lmoe
from lightning_moe.architecture import Architecture, count_params
from lightning_moe.models import DenseFFN, Transformer, build_model, num_params

# GQA, a leading dense layer, a shared expert, swiglu: the structure of the trillion preset, tiny.
SMALL = Architecture(3, 32, 4, 64, 16, 8, 2, kv_heads=2, head_dim=8, ffn_hidden=48, shared_experts=1, dense_layers=1)


@pytest.mark.parametrize(
    "arch",
    [
        SMALL,
        Architecture(4, 24, 3, 50, 20, 6, 2, tie_embeddings=True, activation="gelu", dense_activation="swiglu",
                     ffn_hidden=40, moe_every=2),
        Architecture(2, 16, 2, 30, 8, 4, 1, head_dim=12, v_head_dim=6, shared_experts=2, activation="relu"),
    ],
)
def test_built_count_equals_planner(arch):
    assert num_params(build_model(arch)) == count_params(arch).total


@pytest.mark.parametrize(
    ("field", "value"), [("kv_lora_rank", 16), ("qk_norm", True), ("bias", True), ("activation", "geglu")]
)
def test_build_model_rejects_what_it_cannot_build(field, value):
    with pytest.raises(ValueError, match=field):
        build_model(Architecture(2, 16, 2, 30, 8, 4, 1, **{field: value}))


def test_layers_follow_the_planner_rule_and_the_model_is_causal():
    torch.manual_seed(0)
    model = Transformer(SMALL)
    assert [isinstance(b.ffn, lmoe.MoE) for b in model.blocks] == [False, True, True]
    tokens = torch.randint(SMALL.vocab, (2, 7))
    logits = model(tokens)
    assert logits.shape == (2, 7, SMALL.vocab)
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % SMALL.vocab
    after = model(changed)
    torch.testing.assert_close(after[:, :4], logits[:, :4])  # no position sees a later token
    assert not torch.allclose(after[:, 4:], logits[:, 4:])
    assert model.aux_loss() > 0 and model.aux_loss().requires_grad


def test_learned_positions_and_moe_kwargs():
    arch = Architecture(2, 16, 2, 32, 8, 4, 2, tie_embeddings=True, activation="gelu")
    model = Transformer(arch, max_seq_len=12, moe_kwargs={"capacity_factor": 1.0, "aux_loss_coef": 0.5})
    assert num_params(model) == count_params(arch).total + 12 * 16
    assert model.head.weight is model.embed.weight
    assert all(b.ffn.capacity_factor == 1.0 and b.ffn.aux_loss_coef == 0.5 for b in model.blocks)
    repeated = torch.full((1, 5), 3)  # the same token everywhere: only positions tell the places apart
    logits = model(repeated)
    assert not torch.allclose(logits[0, 0], logits[0, 4])
    nope = Transformer(arch)(repeated)
    torch.testing.assert_close(nope[0, 0], nope[0, 4])
    with pytest.raises(ValueError, match="max_seq_len=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\['activation', 'num_experts'\] are set by the Architecture"):
        Transformer(arch, moe_kwargs={"num_experts": 2, "activation": "relu"})
    with pytest.raises(ValueError, match="max_seq_len=0"):
        Transformer(arch, max_seq_len=0)


def test_dense_model_upcycles_exactly():
    arch = Architecture(2, 16, 2, 32, 24, 1, 1, dense_layers=2, ffn_hidden=24, activation="swiglu")
    torch.manual_seed(1)
    model = Transformer(arch, max_seq_len=8).eval()
    assert all(isinstance(b.ffn, DenseFFN) for b in model.blocks) and float(model.aux_loss()) == 0
    tokens = torch.randint(32, (2, 8))
    with torch.no_grad():
        before = model(tokens)
    report = lmoe.upcycle(model, num_experts=4, top_k=2)
    assert [m.name for m in report.converted] == ["blocks.0.ffn", "blocks.1.ffn"] and report.exact
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)
