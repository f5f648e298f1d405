"""torch.compile of models with MoE layers: no graph break (the layer's host sync is inside a custom operator),
no recompilation as the routing changes, and the same outputs and gradients as eager."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_moe import MoE
from lightning_moe.architecture import Architecture
from lightning_moe.models import Transformer

ARCH = Architecture(layers=2, dim=32, heads=4, vocab=64, expert_hidden=32, experts=4, top_k=2)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Not expert choice yet: ExpertChoiceRouter.capacity reads a host int back from a tensor (.item(), a break).
@pytest.mark.parametrize("option", [dict(), dict(capacity_factor=0.75), dict(activation="swiglu", num_shared_experts=1),
                                    dict(score_func="sigmoid", bias_update_rate=0.01)])
def test_moe_layer_traces_in_one_graph(option):
    torch.manual_seed(0)
    layer = MoE(16, 4, top_k=2, hidden_dim=24, **option)
    explained = torch._dynamo.explain(layer)(torch.randn(2, 6, 16), padding_mask=torch.rand(2, 6) < 0.3)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_transformer_with_moe_layers_traces_in_one_graph():
    torch.manual_seed(0)
    explained = torch._dynamo.explain(Transformer(ARCH, max_seq_len=16))(torch.randint(64, (3, 16)))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


def _compare_compiled_with_eager(backend: str, steps: int = 3) -> None:
    torch.manual_seed(0)
    model = Transformer(ARCH, max_seq_len=16)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in range(steps):  # new tokens each step: new routing, new expert counts
        tokens = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(step))
        out, ref = compiled(tokens), eager(tokens)
        (out.square().mean() + model.aux_loss()).backward()
        (ref.square().mean() + eager.aux_loss()).backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
        model.zero_grad()
        eager.zero_grad()
    # One graph for all steps: no recompilation as the counts change.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1
    assert [b.ffn.forward_count for b in model.blocks] == [steps] * ARCH.layers


def test_compiled_graph_with_aot_autograd_matches_eager():
    """The custom operators' shape functions and backward, through AOTAutograd (no code generation: quick)."""
    _compare_compiled_with_eager("aot_eager")


@pytest.mark.slow
def test_compiled_default_mode_matches_eager():
    """``torch.compile`` default mode (inductor): about a minute on a loaded 2-core CPU, most of it compiling."""
    _compare_compiled_with_eager("inductor")
