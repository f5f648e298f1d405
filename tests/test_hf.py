"""lightning_moe.from_hf / to_hf on tiny random transformers models of every named family (no download).

Per family: eval logits equal after conversion (fp32 to 1e-5; bf16 within HF's own bf16 error), the
gradient of every parameter outside the MoE blocks equal after one backward, the trained model back
through to_hf -> save_pretrained -> from_pretrained to 1e-5, HF's training loss reproduced with
aux_loss="hf", and the refusals.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

import lightning_moe as lmoe  # noqa: E402
from lightning_moe.distributed import shard_moe_layer  # noqa: E402
from lightning_moe.hf import HFMoEBlock  # noqa: E402

VOCAB = 64
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_norm", "olmoe", "deepseek_v3", "gpt_oss"]
WITH_HF_AUX = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]  # DeepSeek-V3 has no HF aux loss


def tiny_config(family: str, num_experts: int = 4, **overrides):
    """A random-initialised 2-layer config of ``family`` (dims multiples of 8: HF's bf16 grouped_mm needs them)."""
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=num_experts,
                                            num_experts_per_tok=2, router_aux_loss_coef=0.02)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=16, intermediate_size=32,
                                             shared_expert_intermediate_size=24, num_experts=num_experts,
                                             num_experts_per_tok=2)
    elif family in ("qwen3_moe", "qwen3_moe_norm"):
        config = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=16, intermediate_size=32, head_dim=8,
                                             num_experts=num_experts, num_experts_per_tok=2,
                                             norm_topk_prob=family == "qwen3_moe_norm")
    elif family == "olmoe":
        config = transformers.OlmoeConfig(**common, intermediate_size=16, num_experts=num_experts,
                                          num_experts_per_tok=2)
    elif family == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **common, moe_intermediate_size=16, intermediate_size=32, n_routed_experts=2 * num_experts,
            num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
            q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(**common, intermediate_size=16, num_local_experts=num_experts,
                                           num_experts_per_tok=2, head_dim=8, sliding_window=8)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    if family == "deepseek_v3":  # give the score-correction bias something to do (HF initialises it to 0)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model


def _ids(seed: int = 1, shape=(3, 12)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_logits_equal_after_from_hf(family):
    model = tiny_model(family).eval()
    original = copy.deepcopy(model)
    report = lmoe.from_hf(model)
    assert len(report.blocks) == (1 if family == "deepseek_v3" else 2)
    assert all(isinstance(model.get_submodule(b.path), HFMoEBlock) for b in report.blocks)
    ids = _ids()
    with torch.no_grad():
        diff = _max_diff(model(ids).logits, original(ids).logits)
    assert diff < 1e-5, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_matches_hf_bf16(family):
    """bf16 logits: within 2 bf16 steps of HF's bf16 logits, and as close to the fp32 model as HF's."""
    fp32 = tiny_model(family).eval()
    hf16 = copy.deepcopy(fp32).bfloat16()
    ours16 = copy.deepcopy(fp32).bfloat16()
    lmoe.from_hf(ours16)
    ids = _ids(shape=(4, 16))
    with torch.no_grad():
        ref, hf, ours = fp32(ids).logits, hf16(ids).logits, ours16(ids).logits
    step = 2.0 ** -8 * float(ref.abs().max())
    assert ours.dtype == torch.bfloat16
    assert _max_diff(ours, hf) <= 2 * step, (_max_diff(ours, hf), step)
    assert _max_diff(ours, ref) <= 1.5 * _max_diff(hf, ref) + step


def _outside_moe_grads(model, blocks: list[str]) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()
            if not any(name.startswith(block + ".") for block in blocks)}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_outside_moe_blocks_equal(family):
    model = tiny_model(family).train()
    original = copy.deepcopy(model)
    report = lmoe.from_hf(model)
    blocks = [b.path for b in report.blocks]
    ids = _ids()
    original(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    ours, theirs = _outside_moe_grads(model, blocks), _outside_moe_grads(original, blocks)
    assert set(ours) == set(theirs) and len(ours) > 10
    for name, grad in theirs.items():
        assert grad is not None and _max_diff(ours[name], grad) < 1e-5, name
    for block in blocks:  # the router weight is the same tensor: its gradient is HF's too
        router = original.get_submodule(block).get_submodule("router" if family == "gpt_oss" else "gate")
        assert _max_diff(model.get_submodule(block).moe.router.gate.weight.grad, router.weight.grad) < 1e-5


@pytest.mark.parametrize("weights", ["copy", "view"])
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_model_round_trips_through_save_pretrained(family, weights, tmp_path):
    model = tiny_model(family)
    original = copy.deepcopy(model).eval()
    lmoe.from_hf(model, weights=weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = _ids()
    for _ in range(2):
        model.train()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    back = lmoe.to_hf(model)
    assert back.direction == "to_hf" and not any(isinstance(m, HFMoEBlock) for m in model.modules())
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert _max_diff(model(ids).logits, trained) < 1e-5
        assert _max_diff(loaded(ids).logits, trained) < 1e-5
        assert _max_diff(original(ids).logits, trained) > 1e-3  # training moved it: the check can fail


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_weights_view_shares_hf_storage(family):
    model = tiny_model(family)
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    report = lmoe.from_hf(model, weights="view")
    bank = model.model.layers[0].mlp.moe.experts
    assert bank.w2.untyped_storage().data_ptr() == down.untyped_storage().data_ptr()  # a view in every layout
    if family == "gpt_oss":  # interleaved gate/up: one de-interleaved copy, HF's tensor released
        assert report.copied_bytes == 2 * (gate_up.numel() + experts.gate_up_proj_bias.numel()) * 4
        assert bank.w1.is_contiguous()
        torch.testing.assert_close(bank.w1, gate_up[..., 0::2])
    else:
        assert report.copied_bytes == 0
        assert bank.w1.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
        with torch.no_grad():
            bank.w1[0, 0, 0] = 42.0  # ours IS HF's storage
        assert gate_up[0, 0, 0] == 42.0
    back = lmoe.to_hf(model)
    restored = model.model.layers[0].mlp.experts.gate_up_proj
    if family != "gpt_oss":
        assert back.copied_bytes == 0 and restored.data_ptr() == gate_up.data_ptr()
    torch.testing.assert_close(restored, gate_up)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_weights_copy_is_contiguous_and_releases_hf_tensors(family):
    model = tiny_model(family)
    block = model.model.layers[0].mlp
    gate_up = block.experts.gate_up_proj.detach().clone()
    router = getattr(block, "router" if family == "gpt_oss" else "gate").weight
    report = lmoe.from_hf(model)  # weights="copy"
    assert report.copied_bytes > 0
    bank = model.model.layers[0].mlp.moe.experts
    assert all(getattr(bank, n).is_contiguous() for n in ("w1", "w2", "w3"))
    assert block.experts.gate_up_proj.is_meta  # the kept HF block holds no copy
    assert model.model.layers[0].mlp.moe.router.gate.weight is router  # routers keep HF's own Parameter
    first = gate_up[..., 0::2] if family == "gpt_oss" else gate_up[:, :16].mT
    torch.testing.assert_close(bank.w1, first)


def test_to_hf_assembles_tensors_when_the_views_are_gone():
    model = tiny_model("qwen2_moe").eval()
    lmoe.from_hf(model)
    twin = copy.deepcopy(model)  # deepcopy gives every view its own storage
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    report = lmoe.to_hf(twin)
    assert report.copied_bytes > 0
    with torch.no_grad():
        assert _max_diff(twin(ids).logits, expected) < 1e-6


@pytest.mark.parametrize("family", WITH_HF_AUX)
def test_aux_loss_hf_reproduces_hf_training_loss(family):
    model = tiny_model(family).train()
    original = copy.deepcopy(model)
    original.config.output_router_logits = True
    report = lmoe.from_hf(model, aux_loss="hf")
    assert report.aux_loss_coef == 0 and all(b.moe.aux_loss_coef == 0 for b in _wrappers(model))
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # HF's loss leaves padding out; so must the recorded logits
    ours, theirs = model(ids, attention_mask=mask, labels=ids), original(ids, attention_mask=mask, labels=ids)
    assert len(ours.router_logits) == len(theirs.router_logits) > 0
    assert abs(float(ours.aux_loss.detach() - theirs.aux_loss.detach())) < 1e-5
    assert abs(float(ours.loss.detach() - theirs.loss.detach())) < 1e-5
    assert float(theirs.aux_loss.detach()) > 0
    lmoe.to_hf(model)
    assert model.config.output_router_logits is False  # restored to the value before conversion
    out = model(ids, labels=ids, output_router_logits=True)  # HF's own routers record again
    assert len(out.router_logits) == len(theirs.router_logits)


def _wrappers(model):
    return [m for m in model.modules() if isinstance(m, HFMoEBlock)]


def test_default_aux_loss_is_per_layer_with_hf_coefficient_scaled():
    model = tiny_model("mixtral")
    model.config.output_router_logits = True
    report = lmoe.from_hf(model)
    # router_aux_loss_coef * top_k / layers: HF's value at balance, spread over the layers.
    assert report.aux_loss == "lightning_moe" and report.aux_loss_coef == pytest.approx(0.02 * 2 / 2)
    assert model.config.output_router_logits is False  # not added twice
    assert all(b.moe.aux_loss_coef == report.aux_loss_coef and b.moe.z_loss_coef == 0 for b in _wrappers(model))
    model(_ids())
    assert all(float(b.moe.aux_loss.detach()) > 0 for b in _wrappers(model))
    lmoe.to_hf(model)
    assert model.config.output_router_logits is True
    report = lmoe.from_hf(tiny_model("mixtral"), aux_loss_coef=0.5, z_loss_coef=1e-3)
    assert (report.aux_loss_coef, report.z_loss_coef) == (0.5, 1e-3)


def test_moe_lightning_module_adds_the_converted_layers_losses():
    class Wrapped(lmoe.MoELightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("qwen3_moe")

        def training_step(self, ids, batch_idx):
            return self.model(ids, labels=ids).loss

    module = Wrapped()
    lmoe.from_hf(module.model)
    ids = _ids()
    assert len(module.moe_layers()) == 2
    loss = module.training_step(ids, 0)
    task = module.model(ids, labels=ids).loss
    torch.testing.assert_close(loss, task + sum(layer.aux_loss for _, layer in module.moe_layers()))


def test_report_lists_blocks_params_and_routing():
    model = tiny_model("deepseek_v3")
    report = lmoe.from_hf(model)
    (block,) = report.blocks
    assert block.path == "model.layers.1.mlp" and block.block_type == "DeepseekV3MoE"
    assert "sigmoid" in block.routing and "2 of 4 groups" in block.routing and "x2.5" in block.routing
    assert block.params == sum(p.numel() for p in model.model.layers[1].mlp.parameters())
    assert report.total_params == sum(p.numel() for p in model.parameters())
    text = str(report)
    assert "DeepseekV3MoE" in text and "bytes copied (once; nothing is duplicated)" in text
    moe = model.model.layers[1].mlp.moe
    assert moe.use_expert_bias and moe.num_groups == 4 and moe.routed_scaling_factor == 2.5


def test_bias_update_rate_continues_balancing_into_the_hf_bias(tmp_path):
    model = tiny_model("deepseek_v3")
    hf_bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    before = hf_bias.clone()
    lmoe.from_hf(model, bias_update_rate=0.01)
    moe = model.model.layers[1].mlp.moe
    assert moe.router.expert_bias is hf_bias  # HF's buffer is our expert_bias
    model(_ids())
    moe.update_expert_bias()
    lmoe.to_hf(model)
    assert not torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias, before)
    with pytest.raises(ValueError, match="score-correction bias"):
        lmoe.from_hf(tiny_model("mixtral"), bias_update_rate=0.01)


# -- refusals -------------------------------------------------------------------------------------


def test_refuses_a_model_without_moe_blocks():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no sparse MoE block"):
        lmoe.from_hf(transformers.AutoModelForCausalLM.from_config(config))


class LegacySparseMoeBlock(torch.nn.Module):
    """The transformers v4 style: experts as a ModuleList of MLPs."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 4, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))


def test_refuses_an_unknown_moe_block_type_by_name():
    model = tiny_model("qwen3_moe")
    model.model.layers[1].mlp = LegacySparseMoeBlock()
    with pytest.raises(ValueError, match="LegacySparseMoeBlock"):
        lmoe.from_hf(model)
    report = lmoe.from_hf(model, strict=False)  # or convert the rest and list it
    assert [b.path for b in report.blocks] == ["model.layers.0.mlp"]
    assert report.skipped[0][:2] == ("model.layers.1.mlp", "LegacySparseMoeBlock")
    assert "LegacySparseMoeBlock" in str(report)


def test_refuses_a_router_it_cannot_reproduce():
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate
    forward = type(router).forward
    router.forward = lambda h: (lambda out: (out[0], out[1].sqrt(), out[2]))(forward(router, h))  # odd weights
    with pytest.raises(ValueError, match="MixtralTopKRouter routes like none"):
        lmoe.from_hf(model)


def test_refuses_an_already_converted_model_and_to_hf_on_an_unconverted_one():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="holds no block converted"):
        lmoe.to_hf(model)
    lmoe.from_hf(model)
    with pytest.raises(ValueError, match="already converted"):
        lmoe.from_hf(model)


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="aux_loss='switch'"):
        lmoe.from_hf(tiny_model("olmoe"), aux_loss="switch")
    with pytest.raises(ValueError, match="aux_loss_coef=0.1 needs aux_loss='lightning_moe'"):
        lmoe.from_hf(tiny_model("olmoe"), aux_loss="hf", aux_loss_coef=0.1)
    with pytest.raises(ValueError, match="weights='share'"):
        lmoe.from_hf(tiny_model("olmoe"), weights="share")
    holder = torch.nn.ModuleDict({"mlp": tiny_model("olmoe").model.layers[0].mlp})  # no HF model around it
    with pytest.raises(ValueError, match="aux_loss='hf' needs a model that records router_logits"):
        lmoe.from_hf(holder, aux_loss="hf")
    assert len(lmoe.from_hf(holder, verify=False).blocks) == 1  # the default semantics work on any module


def test_to_hf_refuses_an_expert_parallel_shard():
    model = tiny_model("olmoe")
    lmoe.from_hf(model)
    # as the "moe" strategy leaves a layer with checkpoint="sharded": half of its experts, EP dispatcher installed
    shard_moe_layer(model.model.layers[0].mlp.moe, "model.layers.0.mlp.moe", ep_rank=0, ep_size=2, group=None)
    with pytest.raises(ValueError, match="sharded over an expert-parallel group"):
        lmoe.to_hf(model)


def test_transformers_private_names_still_exist():
    from transformers.utils import output_capturing

    assert callable(output_capturing.install_output_capuring_hook)
    assert callable(output_capturing.maybe_install_capturing_hooks)
    assert hasattr(output_capturing, "_CAN_RECORD_REGISTRY")


def test_package_imports_without_transformers_and_from_hf_says_how_to_install():
    code = (
        "import importlib.metadata as md, sys\n"
        "real = md.distribution, md.version\n"
        "def hide(fn):\n"
        "    def wrapped(name):\n"
        "        if name == 'transformers':\n"
        "            raise md.PackageNotFoundError(name)\n"
        "        return fn(name)\n"
        "    return wrapped\n"
        "md.distribution, md.version = hide(real[0]), hide(real[1])  # torchmetrics asks the metadata\n"
        "sys.modules['transformers'] = None  # and any import of it fails, as if not installed\n"
        "import torch, lightning_moe as lmoe\n"
        "try:\n"
        "    lmoe.from_hf(torch.nn.Linear(2, 2))\n"
        "except ImportError as e:\n"
        "    print('HINT', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'lightning-moe[hf]'" in out.stdout
