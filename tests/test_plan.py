"""Tests of the capacity planner; expected figures are derived by hand here or taken from publications."""

import dataclasses
import json
import math

import pytest

from lightning_moe.plan import (
    PRESETS,
    Architecture,
    Layout,
    activation_bytes,
    all_to_all_bytes,
    count_params,
    flops_per_token,
    layer_activation_bytes,
    main,
    params_per_rank,
    plan,
)

GIB = 1024**3


def rel_err(value: float, published: float) -> float:
    return abs(value - published) / published


def swiglu_gqa_by_hand(layers, d, heads, kv, hd, vocab, fe, experts, top_k, qk_norm=False):
    """(total, active, routed experts, embedding) of a Mixtral/Qwen3-style model, written out term by term."""
    embedding = 2 * vocab * d  # untied input embedding and lm head
    attention = layers * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + (2 * hd if qk_norm else 0))
    norms = 2 * d * layers + d
    router = layers * d * experts
    expert = 3 * d * fe  # gate, up, down
    routed = layers * experts * expert
    total = embedding + attention + norms + router + routed
    active = embedding + attention + norms + router + layers * top_k * expert
    return total, active, routed, embedding


MIXTRAL_8X7B = swiglu_gqa_by_hand(32, 4096, 32, 8, 128, 32000, 14336, 8, 2)
MIXTRAL_8X22B = swiglu_gqa_by_hand(56, 6144, 48, 8, 128, 32768, 16384, 8, 2)
QWEN3_30B = swiglu_gqa_by_hand(48, 2048, 32, 4, 128, 151936, 768, 128, 8, qk_norm=True)
QWEN3_235B = swiglu_gqa_by_hand(94, 4096, 64, 4, 128, 151936, 1536, 128, 8, qk_norm=True)


def glam_by_hand():
    """GLaM 64B/64E: 64 layers, 32 of them MoE (GELU experts), 32 with gated-GELU dense FFNs, tied 256k vocab."""
    attention = 64 * 4 * 8192 * 128 * 128
    dense_ffn = 32 * 3 * 8192 * 32768
    expert = 2 * 8192 * 32768
    rest = 256000 * 8192 + attention + dense_ffn + 32 * 8192 * 64 + (2 * 64 + 1) * 8192
    return rest + 32 * 64 * expert, rest + 32 * 2 * expert


def deepseek_v3_by_hand():
    """DeepSeek-V3: MLA attention, 3 dense layers, 58 MoE layers with 256 routed + 1 shared expert (top-8)."""
    q = 7168 * 1536 + 1536 + 1536 * 128 * (128 + 64)  # q_a, q_a_norm, q_b
    kv = 7168 * (512 + 64) + 512 + 512 * 128 * (128 + 128)  # kv_a (with rope key), kv_a_norm, kv_b
    attention = 61 * (q + kv + 128 * 128 * 7168)
    expert = 3 * 7168 * 2048
    rest = 2 * 129280 * 7168 + attention + (2 * 61 + 1) * 7168 + 3 * 3 * 7168 * 18432 + 58 * (7168 * 256 + expert)
    return rest + 58 * 256 * expert, rest + 58 * 8 * expert


# (preset, exact total by hand, exact active by hand, published total, published active, tolerance)
PUBLISHED = [
    ("mixtral-8x7b", MIXTRAL_8X7B[0], MIXTRAL_8X7B[1], 46.7e9, 12.9e9, 0.01),
    ("mixtral-8x22b", MIXTRAL_8X22B[0], MIXTRAL_8X22B[1], 141e9, 39e9, 0.01),
    # Qwen states "3.3B activated"; the exact count is 3.353B (Qwen truncates: 30.53B is "30.5B" too).
    ("qwen3-30b-a3b", QWEN3_30B[0], QWEN3_30B[1], 30.5e9, 3.3e9, 0.02),
    ("qwen3-235b-a22b", QWEN3_235B[0], QWEN3_235B[1], 235e9, 22e9, 0.01),
    # GLaM's "1.2T" has two significant digits (exact: 1.162T); its 96.6B active has three.
    ("glam-64e", *glam_by_hand(), 1.2e12, 96.6e9, 0.04),
    ("deepseek-v3", *deepseek_v3_by_hand(), 671e9, 37e9, 0.02),
]


@pytest.mark.parametrize(("preset", "total", "active", "pub_total", "pub_active", "tol"), PUBLISHED)
def test_published_parameter_counts(preset, total, active, pub_total, pub_active, tol):
    counts = count_params(PRESETS[preset])
    assert (counts.total, counts.active) == (total, active)
    assert rel_err(counts.total, pub_total) < tol
    assert rel_err(counts.active, pub_active) < tol


def test_published_counts_within_one_percent_where_published_precisely():
    assert rel_err(count_params(PRESETS["mixtral-8x7b"]).total, 46.7e9) < 0.01
    assert rel_err(count_params(PRESETS["mixtral-8x7b"]).active, 12.9e9) < 0.01
    assert rel_err(count_params(PRESETS["qwen3-30b-a3b"]).total, 30.5e9) < 0.01
    qwen = count_params(PRESETS["qwen3-30b-a3b"])
    assert rel_err(qwen.total - qwen.embedding, 29.9e9) < 0.01  # Qwen's "non-embedding parameters: 29.9B"
    assert rel_err(count_params(PRESETS["glam-64e"]).active, 96.6e9) < 0.01
    assert rel_err(count_params(PRESETS["deepseek-v3"]).total, 671e9) < 0.01
    assert count_params(PRESETS["trillion"]).total > 1e12


def test_per_rank_counts_ep8_replicated():
    total, _, routed, _ = MIXTRAL_8X7B
    layout = Layout(gpus=8, gpu_memory=80 * GIB, ep=8, dense_sharding="replicated")
    rank = params_per_rank(PRESETS["mixtral-8x7b"], layout)
    assert rank.local_experts == 1
    assert rank.expert == 32 * 1 * 3 * 4096 * 14336
    assert rank.dense == total - routed
    assert (rank.expert_stored, rank.dense_stored) == (rank.expert, rank.dense)
    assert rank.materialised == rank.stored == total - routed + routed // 8


def test_per_rank_counts_fully_sharded():
    total, _, routed, _ = MIXTRAL_8X7B
    layout = Layout(gpus=16, gpu_memory=80 * GIB, ep=4, dp=4, dense_sharding="full", expert_sharding="full")
    rank = params_per_rank(PRESETS["mixtral-8x7b"], layout)
    assert rank.local_experts == 2
    assert rank.expert == routed // 4
    assert rank.expert_stored == -(-(routed // 4) // 4)
    assert rank.dense_stored == -(-(total - routed) // 16)
    # default expert sharding keeps the local experts whole
    rank = params_per_rank(PRESETS["mixtral-8x7b"], dataclasses.replace(layout, expert_sharding="replicated"))
    assert rank.expert_stored == routed // 4


def test_per_rank_counts_trillion_on_10000_gpus():
    arch = PRESETS["trillion"]
    rank = params_per_rank(arch, Layout(gpus=10_000, gpu_memory=80 * GIB, ep=400))
    expert = 3 * 7168 * 2048
    assert rank.local_experts == 1
    assert rank.expert == 63 * expert  # 63 MoE layers after 1 dense layer, one local expert each
    assert rank.expert + 63 * 399 * expert == count_params(arch).total - rank.dense


def test_state_bytes_follow_precisions():
    arch, layout = PRESETS["mixtral-8x7b"], Layout(gpus=8, gpu_memory=80 * GIB, ep=8)
    stored = params_per_rank(arch, layout).stored
    p = plan(arch, layout)
    assert (p.param_bytes, p.grad_bytes, p.optimizer_bytes) == (2 * stored, 4 * stored, 12 * stored)
    p = plan(arch, dataclasses.replace(layout, weight_dtype="fp32", grad_dtype="bf16", optim_dtype="bf16"))
    assert (p.param_bytes, p.grad_bytes, p.optimizer_bytes) == (4 * stored, 2 * stored, 4 * stored)
    p = plan(arch, dataclasses.replace(layout, master_weights=False))
    assert p.optimizer_bytes == 8 * stored
    assert p.total_bytes == p.param_bytes + p.grad_bytes + p.optimizer_bytes + p.activation_bytes


def gpt_block(**kw):
    """A dense GPT block (4h GELU MLP, dropout, MHA) in Korthikanti et al.'s setting: every layer dense."""
    return Architecture(layers=2, dim=1024, heads=16, vocab=1000, expert_hidden=1, experts=1, top_k=1,
                        ffn_hidden=4096, activation="gelu", dense_layers=2, dropout=True, **kw)  # fmt: skip


def test_activations_match_korthikanti():
    arch, layout = gpt_block(), Layout(gpus=1, gpu_memory=GIB, micro_batch=2, seq_len=512)
    s, b, h, a = 512, 2, 1024, 16
    assert layer_activation_bytes(arch, layout, moe=False) == s * b * h * 34 + 5 * a * s * s * b
    output = s * b * (2 * h + 4 * 1000)
    assert activation_bytes(arch, layout) == 2 * (s * b * h * 34 + 5 * a * s * s * b) + output
    ckpt = dataclasses.replace(layout, activation_checkpointing=True)
    assert activation_bytes(arch, ckpt) == 2 * s * b * h * 2 + (s * b * h * 34 + 5 * a * s * s * b) + output
    flash = dataclasses.replace(layout, flash_attention=True)
    assert layer_activation_bytes(arch, flash, moe=False) == s * b * h * 34 + 4 * s * b * a


def test_moe_layer_activations():
    arch = PRESETS["mixtral-8x7b"]
    layout = Layout(gpus=8, gpu_memory=80 * GIB, ep=8, seq_len=1024, flash_attention=True)
    t, d, f = 1024, 4096, 14336
    attention = t * 2 * (d + 4096 + 2 * 1024 + 4096) + 4 * t * 32 + 2 * t * 2 * d
    ffn = t * (2 * d + 4 * 8 + 2 * 2 * (2 * d + 3 * f))  # input, router logits, 2 x (dispatch, combine, hiddens)
    assert layer_activation_bytes(arch, layout, moe=True) == attention + ffn
    # activations do not depend on ep (balanced routing)
    assert activation_bytes(arch, layout) == activation_bytes(arch, dataclasses.replace(layout, ep=2))


def test_flops_per_token():
    total, active, _, embedding = MIXTRAL_8X7B
    norms = 2 * 4096 * 32 + 4096
    matmul = active - embedding // 2 - norms  # the input lookup and norms are not matmuls
    assert flops_per_token(PRESETS["mixtral-8x7b"], 4096) == 2 * matmul + 2 * 2 * 32 * 4096 * 32 * 128
    p = plan(PRESETS["mixtral-8x7b"], Layout(gpus=8, gpu_memory=80 * GIB, ep=8, seq_len=4096))
    assert p.train_flops_per_token == 3 * p.flops_per_token


def test_all_to_all_bytes():
    arch = PRESETS["mixtral-8x7b"]
    layout = Layout(gpus=8, gpu_memory=80 * GIB, ep=8, micro_batch=2, seq_len=1024)
    per_layer = 2 * 1024 * 2 * 4096 * 2  # tokens * top_k * dim * bf16
    assert all_to_all_bytes(arch, layout) == 32 * per_layer * 2 * 2 * 7 // 8
    assert all_to_all_bytes(arch, dataclasses.replace(layout, ep=1)) == 0
    ckpt = dataclasses.replace(layout, activation_checkpointing=True)  # the forward is recomputed
    assert all_to_all_bytes(arch, ckpt) == 32 * per_layer * 2 * 3 * 7 // 8


def test_fits_and_min_ep():
    arch = PRESETS["mixtral-8x7b"]
    # ~5.84B params per GPU x 18 bytes alone exceed 80 GiB, at any ep
    p = plan(arch, Layout(gpus=8, gpu_memory=80 * GIB, ep=8))
    assert not p.fits and p.min_ep_that_fits is None and p.total_bytes > 80 * GIB
    # an H200 fits it with checkpointing and flash attention, but only with one expert per GPU
    h200 = Layout(gpus=8, gpu_memory=141 * GIB, ep=8, activation_checkpointing=True, flash_attention=True)
    p = plan(arch, h200)
    assert p.fits and p.min_ep_that_fits == 8 and p.total_bytes <= 141 * GIB
    assert not plan(arch, dataclasses.replace(h200, ep=4)).fits
    # sharding experts over their data-parallel group makes memory ep-independent: ep=1 fits on 64 GPUs
    assert plan(arch, dataclasses.replace(h200, gpus=64, expert_sharding="full")).min_ep_that_fits == 1


def test_min_ep_is_the_threshold():
    arch = Architecture(layers=2, dim=64, heads=4, vocab=100, expert_hidden=128, experts=8, top_k=2)
    base = Layout(gpus=8, gpu_memory=GIB, seq_len=16)
    by_ep = {ep: plan(arch, dataclasses.replace(base, ep=ep)).total_bytes for ep in (1, 2, 4, 8)}
    # two MoE layers of 8 / ep local experts of 3*64*128 params, 18 bytes each (bf16 + fp32 grad + Adam + master)
    assert by_ep[1] - by_ep[2] == 18 * 2 * 4 * 3 * 64 * 128
    for ep in (1, 2, 4, 8):
        assert plan(arch, dataclasses.replace(base, gpu_memory=by_ep[ep])).min_ep_that_fits == ep


def test_trillion_on_10000_gpus():
    layout = Layout(gpus=10_000, gpu_memory=80 * GIB, ep=400, activation_checkpointing=True, flash_attention=True)
    p = plan(PRESETS["trillion"], layout)
    assert p.total_params > 1e12 and p.dp == 25
    assert p.fits and p.min_ep_that_fits == 400


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (dict(gpus=8, ep=3), r"ep=3 must divide experts=8; pick ep in \[1, 2, 4, 8\]"),
        (dict(gpus=12, ep=8), r"ep=8 must divide gpus=12; pick ep in \[1, 2, 4\]"),
        (dict(gpus=16, ep=4, dp=3), r"dp\*ep must equal gpus.*set dp=4"),
    ],
)
def test_bad_layouts(layout, match):
    with pytest.raises(ValueError, match=match):
        plan(PRESETS["mixtral-8x7b"], Layout(gpu_memory=80 * GIB, **layout))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Layout(gpus=8, gpu_memory=GIB, weight_dtype="fp12"), r"weight_dtype='fp12' unknown; pick one of"),
        (lambda: Layout(gpus=8, gpu_memory=GIB, dense_sharding="zero2"), r"dense_sharding='zero2' unknown"),
        (lambda: Layout(gpus=0, gpu_memory=GIB), r"gpus=0 must be a positive integer"),
        (lambda: dataclasses.replace(PRESETS["mixtral-8x7b"], kv_heads=5), r"kv_heads=5 must divide heads=32"),
        (lambda: dataclasses.replace(PRESETS["mixtral-8x7b"], top_k=9), r"top_k=9 must be <= experts=8"),
        (lambda: dataclasses.replace(PRESETS["mixtral-8x7b"], dense_layers=1), r"ffn_hidden must be > 0"),
        (lambda: dataclasses.replace(PRESETS["mixtral-8x7b"], activation="tanh"), r"activation='tanh' unknown"),
    ],
)
def test_bad_fields(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cli_json(capsys):
    assert main(["--preset", "mixtral-8x7b", "--gpus", "8", "--ep", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["total_params"], out["active_params"]) == MIXTRAL_8X7B[:2]
    assert out["gpu_memory"] == 80 * GIB and out["fits"] is False and out["min_ep_that_fits"] is None
    assert out["expert_params_per_gpu"] == 32 * 3 * 4096 * 14336


def test_cli_overrides_and_custom(capsys):
    argv = ["--preset", "mixtral-8x7b", "--layers", "16", "--gpu-memory", "141", "--activation-checkpointing", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "mixtral-8x7b (modified)"
    assert out["total_params"] == swiglu_gqa_by_hand(16, 4096, 32, 8, 128, 32000, 14336, 8, 2)[0]
    assert out["ep"] == out["min_ep_that_fits"]  # --ep omitted: the smallest ep that fits
    flags = "--layers 32 --dim 4096 --heads 32 --kv-heads 8 --head-dim 128 --vocab 32000 --expert-hidden 14336 "
    assert main((flags + "--experts 8 --top-k 2 --ep 8 --json").split()) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == MIXTRAL_8X7B[0]
    assert main(["--preset", "glam-64e", "--no-tie-embeddings", "--json", "--ep", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == glam_by_hand()[0] + 256000 * 8192


def test_cli_table_and_errors(capsys):
    assert main(["--preset", "qwen3-30b-a3b", "--gpus", "8", "--ep", "8"]) == 0
    table = capsys.readouterr().out
    assert "total_params" in table and "fits" in table and "30.532 B" in table
    assert main(["--preset", "mixtral-8x7b", "--ep", "3"]) == 2
    assert "ep=3 must divide experts=8; pick ep in [1, 2, 4, 8]" in capsys.readouterr().err
    assert main(["--dim", "64"]) == 2
    assert "--layers" in capsys.readouterr().err
    assert main(["--list-presets"]) == 0
    assert "trillion" in capsys.readouterr().out


def test_tensor_shapes_are_the_built_transformers():
    from lightning_moe.models import build_model
    from lightning_moe.plan import tensor_shapes

    for arch in (PRESETS["trillion"], PRESETS["mixtral-8x7b"],
                 Architecture(3, 32, 4, 64, 16, 8, 2, ffn_hidden=48, shared_experts=2, dense_layers=1,
                              activation="gelu", tie_embeddings=True)):
        shapes = tensor_shapes(arch)
        assert [(n, s) for n, s, _ in shapes] == [(n, tuple(p.shape)) for n, p in build_model(arch).named_parameters()]
        assert {n for n, _, routed in shapes if routed} == {n for n, _, _ in shapes if ".ffn.experts." in n}


def test_fsdp_sharding_splits_every_tensor_over_the_ranks():
    from lightning_moe.plan import fsdp_shard_numel

    for shape, world in (((10, 3), 4), ((3, 8), 4), ((1, 8, 5), 4), ((7,), 16), ((1, 6, 5), 4)):
        parts = [fsdp_shard_numel(shape, world, r) for r in range(world)]
        assert sum(parts) == math.prod(shape) and parts[0] == max(parts), (shape, parts)
    assert [fsdp_shard_numel((1, 8, 5), 4, r) for r in range(4)] == [10] * 4  # a stacked shared expert: dim 1
    arch = Architecture(3, 32, 4, 64, 16, 8, 2, ffn_hidden=48, shared_experts=1, dense_layers=1)
    layout = Layout(gpus=8, gpu_memory=GIB, ep=2, dense_sharding="fsdp", expert_sharding="fsdp")
    shares = [params_per_rank(arch, layout, rank=r) for r in range(8)]
    counts = count_params(arch)
    assert sum(s.dense_stored for s in shares) == counts.total - counts.routed_experts
    assert {s.expert_stored for s in shares} == {counts.routed_experts // 8}  # 4 experts / 4 data ranks, exact
    assert plan(arch, layout).gather_bytes > 0 and plan(arch, dataclasses.replace(layout, dense_sharding="full")
                                                         ).gather_bytes == 0
    with pytest.raises(ValueError, match="dp=3 must divide dim or expert_hidden"):
        params_per_rank(arch, Layout(gpus=6, gpu_memory=GIB, ep=2, expert_sharding="fsdp"))
