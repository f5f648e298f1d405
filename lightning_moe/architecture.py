"""What a Mixture-of-Experts transformer is and how many parameters it has (stdlib only).

:class:`Architecture` describes a decoder-only MoE transformer; :func:`count_params` counts its parameters
exactly; :data:`PRESETS` holds published ones. The capacity planner (:mod:`lightning_moe.plan`) adds where the
model runs (a :class:`~lightning_moe.plan.Layout`); :class:`lightning_moe.models.Transformer` builds it.

Conventions:
    * ``active`` parameters count everything one token touches, embeddings included: input embedding, lm head
      (once if tied), attention, norms, routers, dense FFNs, ``top_k`` routed experts and the shared experts of
      every MoE layer (the convention behind Mixtral 8x7B's "12.9B active").
    * Layer ``i`` (0-based) is MoE iff ``i >= dense_layers`` and ``(i - dense_layers + 1) % moe_every == 0``;
      the others have a dense FFN of width ``ffn_hidden``. ``kv_lora_rank > 0`` selects MLA attention
      (DeepSeek-V3, Kimi K2); multi-token-prediction modules are not counted.

Example:
    >>> arch = PRESETS["mixtral-8x7b"]
    >>> round(count_params(arch).total / 1e9, 1), round(count_params(arch).active / 1e9, 1)
    (46.7, 12.9)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu")
ACTIVATIONS = GATED_ACTIVATIONS + ("gelu", "relu", "silu")


@dataclass(frozen=True)
class Architecture:
    """A decoder-only MoE transformer.

    Args:
        layers: Transformer blocks.
        dim: Model (residual) width.
        heads: Attention (query) heads.
        vocab: Vocabulary size.
        expert_hidden: Hidden width of one routed (or shared) expert.
        experts: Routed experts per MoE layer.
        top_k: Routed experts per token.
        kv_heads: Key/value heads (GQA); default ``heads``.
        head_dim: Query/key head width (MLA: the non-rotary part); default ``dim // heads``.
        tie_embeddings: Share the input embedding with the lm head (default untied, like most MoE models).
        ffn_hidden: Hidden width of the dense FFNs (needed when some layers are dense).
        activation: Expert activation; gated ones (swiglu, geglu, reglu) have 3 matrices, others 2.
        dense_activation: Activation of the dense FFNs; default ``activation``.
        shared_experts: Always-active experts of width ``expert_hidden`` per MoE layer.
        moe_every: Every ``moe_every``-th layer after the leading dense ones is MoE.
        dense_layers: Leading layers with a dense FFN.
        qk_norm: Per-head RMSNorm of queries and keys (``2 * head_dim`` weights per layer).
        bias: Biases on the attention and FFN/expert linears.
        dropout: Trained with dropout (its 1-byte masks enter the activation estimate).
        q_lora_rank: MLA query compression rank (0: direct query projection).
        kv_lora_rank: MLA key/value compression rank; ``> 0`` selects MLA.
        rope_head_dim: MLA decoupled rotary head width.
        v_head_dim: Value head width; default ``head_dim``.
        name: Label shown in the plan.

    Raises:
        ValueError: On an inconsistent field, naming it and the fix.
    """

    layers: int
    dim: int
    heads: int
    vocab: int
    expert_hidden: int
    experts: int
    top_k: int
    kv_heads: int | None = None
    head_dim: int | None = None
    tie_embeddings: bool = False
    ffn_hidden: int = 0
    activation: str = "swiglu"
    dense_activation: str | None = None
    shared_experts: int = 0
    moe_every: int = 1
    dense_layers: int = 0
    qk_norm: bool = False
    bias: bool = False
    dropout: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_head_dim: int = 0
    v_head_dim: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"Architecture: {msg}")

        def ints(names: tuple[str, ...], low: int) -> None:
            for f in names:
                v = getattr(self, f)
                need(isinstance(v, int) and v >= low, f"{f}={v!r} must be an integer >= {low}; set {f}")

        ints(("layers", "dim", "heads", "vocab", "expert_hidden", "experts", "top_k", "moe_every"), 1)
        ints(("ffn_hidden", "shared_experts", "dense_layers", "q_lora_rank", "kv_lora_rank", "rope_head_dim"), 0)
        head_dim = self.dim // self.heads if self.head_dim is None else self.head_dim
        defaults = {"kv_heads": self.heads, "head_dim": head_dim, "v_head_dim": head_dim}
        for f, value in {**defaults, "dense_activation": self.activation}.items():
            if getattr(self, f) is None:
                object.__setattr__(self, f, value)
        ints(("kv_heads", "head_dim", "v_head_dim"), 1)
        need(self.heads % self.attention_dims[1] == 0, f"kv_heads={self.kv_heads} must divide heads={self.heads}")
        need(self.top_k <= self.experts, f"top_k={self.top_k} must be <= experts={self.experts}")
        for f in ("activation", "dense_activation"):
            need(getattr(self, f) in ACTIVATIONS, f"{f}={getattr(self, f)!r} unknown; pick one of {list(ACTIVATIONS)}")
        need(self.dense_layers <= self.layers, f"dense_layers={self.dense_layers} must be <= layers={self.layers}")
        need(
            not self.dense_ffn_layers or self.ffn_hidden > 0,
            f"ffn_hidden must be > 0: {self.dense_ffn_layers} layers have a dense FFN "
            f"(dense_layers={self.dense_layers}, moe_every={self.moe_every}); set ffn_hidden",
        )
        need(self.mla or not (self.q_lora_rank or self.rope_head_dim), "q_lora_rank, rope_head_dim need kv_lora_rank>0")

    @property
    def attention_dims(self) -> tuple[int, int, int, int]:
        """``(heads, kv_heads, head_dim, v_head_dim)`` with the defaults filled in."""
        # __post_init__ replaced every None; the fields keep `int | None` only for the constructor's defaults.
        assert self.kv_heads is not None and self.head_dim is not None and self.v_head_dim is not None
        return self.heads, self.kv_heads, self.head_dim, self.v_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` (0-based) has an MoE FFN: ``i >= dense_layers`` and every ``moe_every``-th after."""
        return i >= self.dense_layers and (i - self.dense_layers + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        """Layers with an MoE FFN."""
        return (self.layers - self.dense_layers) // self.moe_every

    @property
    def dense_ffn_layers(self) -> int:
        """Layers with a dense FFN."""
        return self.layers - self.moe_layers

    @property
    def mla(self) -> bool:
        """Whether attention is multi-head latent attention."""
        return self.kv_lora_rank > 0



def _ffn(arch: Architecture, hidden: int, activation: str) -> tuple[int, int]:
    """(matmul weights, biases) of one FFN / expert."""
    gated = activation in GATED_ACTIVATIONS
    return (3 if gated else 2) * arch.dim * hidden, ((2 if gated else 1) * hidden + arch.dim) * arch.bias


def _attention(arch: Architecture) -> tuple[int, int]:
    """(matmul weights, norms + biases) of one attention block."""
    (h, kv, hd, vd), d, rope = arch.attention_dims, arch.dim, arch.rope_head_dim
    extra = 2 * hd * arch.qk_norm + (h * (hd + rope) + kv * (hd + vd) + d) * arch.bias
    if not arch.mla:
        return d * h * hd + d * kv * (hd + vd) + h * vd * d, extra
    q_lora = arch.q_lora_rank
    q = d * q_lora + q_lora * h * (hd + rope) if q_lora else d * h * (hd + rope)
    kv = d * (arch.kv_lora_rank + rope) + arch.kv_lora_rank * h * (hd + vd)
    return q + kv + h * vd * d, extra + q_lora + arch.kv_lora_rank


@dataclass(frozen=True)
class ParamCounts:
    """Whole-model parameter counts; each component includes its biases and internal norms.

    Attributes:
        embedding: ``vocab*dim``, twice if untied.
        attention: Per layer ``q = dim*heads*head_dim``, ``k, v = dim*kv_heads*head_dim``,
            ``o = heads*head_dim*dim`` (MLA: its low-rank factors and latent norms), qk-norms, biases.
        norms: ``2*dim`` per layer plus the final ``dim``.
        router: ``dim*experts`` per MoE layer.
        routed_experts: ``experts * per_expert`` per MoE layer.
        shared_experts: ``shared_experts * per_expert`` per MoE layer.
        dense_ffn: ``3*dim*ffn_hidden`` (gated) or ``2*dim*ffn_hidden`` per dense-FFN layer.
        per_expert: ``3*dim*expert_hidden`` (gated) or ``2*dim*expert_hidden`` (+ biases).
        total: Sum of the components.
        active: ``total`` minus the routed experts plus ``top_k`` of them per MoE layer.
        matmul_active: Active matmul weights (lm head once, no lookup, norms or biases), for FLOPs.
    """

    embedding: int
    attention: int
    norms: int
    router: int
    routed_experts: int
    shared_experts: int
    dense_ffn: int
    per_expert: int
    total: int
    active: int
    matmul_active: int


def count_params(arch: Architecture) -> ParamCounts:
    """Count parameters (formulas in :class:`ParamCounts`).

    Args:
        arch: The model.

    Returns:
        The counts.
    """
    n_moe, n_dense = arch.moe_layers, arch.dense_ffn_layers
    expert_w, expert_b = _ffn(arch, arch.expert_hidden, arch.activation)
    dense_w, dense_b = _ffn(arch, arch.ffn_hidden, arch.dense_activation or arch.activation)
    attn_w, attn_extra = _attention(arch)
    per_expert = expert_w + expert_b
    parts = {
        "embedding": arch.vocab * arch.dim * (1 if arch.tie_embeddings else 2),
        "attention": arch.layers * (attn_w + attn_extra),
        "norms": arch.layers * 2 * arch.dim + arch.dim,
        "router": n_moe * arch.dim * arch.experts,
        "routed_experts": n_moe * arch.experts * per_expert,
        "shared_experts": n_moe * arch.shared_experts * per_expert,
        "dense_ffn": n_dense * (dense_w + dense_b),
    }
    total = sum(parts.values())
    active = total - parts["routed_experts"] + n_moe * arch.top_k * per_expert
    matmul = arch.vocab * arch.dim + arch.layers * attn_w + parts["router"] + n_dense * dense_w
    matmul += n_moe * (arch.top_k + arch.shared_experts) * expert_w
    return ParamCounts(**parts, per_expert=per_expert, total=total, active=active, matmul_active=matmul)



def tensor_shapes(arch: Architecture) -> list[tuple[str, tuple[int, ...], bool]]:
    """``(name, shape, routed_expert)`` of every parameter tensor of :class:`~lightning_moe.models.Transformer`.

    Names are the model's ``named_parameters``; routed-expert tensors are the stacked ``[experts, ...]`` banks.
    The per-tensor view the capacity planner needs for per-tensor (FSDP2) sharding; it sums to
    :func:`count_params`.

    Raises:
        ValueError: For what the transformer does not build (MLA, qk-norm, biases, tied embeddings are fine).
    """
    if arch.mla or arch.qk_norm or arch.bias:
        raise ValueError("tensor_shapes: MLA, qk_norm and bias are counted by count_params but not built as "
                         "tensors; use count_params, or an Architecture without them")
    (h, kv, hd, vd), d = arch.attention_dims, arch.dim

    def ffn(prefix: str, hidden: int, activation: str, stacked: int | None,
            expert: bool) -> list[tuple[str, tuple[int, ...], bool]]:
        gated = activation in GATED_ACTIVATIONS
        shapes: list[tuple[str, tuple[int, ...], bool]]
        if stacked is None:  # DenseFFN: nn.Linear weights [out, in]
            shapes = [(f"{prefix}.w1.weight", (hidden, d), expert)]
            shapes += [(f"{prefix}.w3.weight", (hidden, d), expert)] if gated else []
            return shapes + [(f"{prefix}.w2.weight", (d, hidden), expert)]
        shapes = [(f"{prefix}.w1", (stacked, d, hidden), expert), (f"{prefix}.w2", (stacked, hidden, d), expert)]
        return shapes + ([(f"{prefix}.w3", (stacked, d, hidden), expert)] if gated else [])

    out: list[tuple[str, tuple[int, ...], bool]] = [("embed.weight", (arch.vocab, d), False)]
    for i in range(arch.layers):
        b = f"blocks.{i}"
        out += [(f"{b}.attn_norm.weight", (d,), False), (f"{b}.attn.q.weight", (h * hd, d), False),
                (f"{b}.attn.k.weight", (kv * hd, d), False), (f"{b}.attn.v.weight", (kv * vd, d), False),
                (f"{b}.attn.o.weight", (d, h * vd), False), (f"{b}.ffn_norm.weight", (d,), False)]
        if arch.is_moe_layer(i):
            out.append((f"{b}.ffn.router.gate.weight", (arch.experts, d), False))
            out += ffn(f"{b}.ffn.experts", arch.expert_hidden, arch.activation, arch.experts, True)
            if arch.shared_experts:
                out += ffn(f"{b}.ffn.shared_experts", arch.expert_hidden * arch.shared_experts, arch.activation, 1,
                           False)
        else:
            out += ffn(f"{b}.ffn", arch.ffn_hidden, arch.dense_activation or arch.activation, None, False)
    out.append(("norm.weight", (d,), False))
    if not arch.tie_embeddings:
        out.append(("head.weight", (arch.vocab, d), False))
    return out


_MLA: dict[str, Any] = {"q_lora_rank": 1536, "kv_lora_rank": 512, "rope_head_dim": 64, "head_dim": 128,
                        "v_head_dim": 128}
_QWEN3: dict[str, Any] = {"kv_heads": 4, "head_dim": 128, "qk_norm": True}

#: Published MoE architectures (field order: layers, dim, heads, vocab, expert_hidden, experts, top_k).
PRESETS: dict[str, Architecture] = {
    a.name: a
    for a in (
        # Mixtral (Mistral AI): 46.7B total / 12.9B active; 141B / 39B.
        Architecture(32, 4096, 32, 32000, 14336, 8, 2, kv_heads=8, head_dim=128, name="mixtral-8x7b"),
        Architecture(56, 6144, 48, 32768, 16384, 8, 2, kv_heads=8, head_dim=128, name="mixtral-8x22b"),
        # Qwen3 MoE (HF configs): 30.5B / 3.3B; 235B / 22B.
        Architecture(48, 2048, 32, 151936, 768, 128, 8, **_QWEN3, name="qwen3-30b-a3b"),
        Architecture(94, 4096, 64, 151936, 1536, 128, 8, **_QWEN3, name="qwen3-235b-a22b"),
        # GLaM 64B/64E (Du et al. 2021): 1.2T / 96.6B; MoE every other layer, GELU experts, gated-GELU dense FFNs.
        Architecture(
            64, 8192, 128, 256000, 32768, 64, 2, head_dim=128, tie_embeddings=True, ffn_hidden=32768,
            activation="gelu", dense_activation="geglu", moe_every=2, name="glam-64e",
        ),
        # DeepSeek-V3: 671B / 37B (MLA; the 14B multi-token-prediction module is not counted).
        Architecture(
            61, 7168, 128, 129280, 2048, 256, 8, ffn_hidden=18432, shared_experts=1, dense_layers=3, **_MLA,
            name="deepseek-v3",
        ),
        # Kimi K2: published "1T / 32B" (counted here: 1.03T / 32.9B).
        Architecture(
            61, 7168, 64, 163840, 2048, 384, 8, ffn_hidden=18432, shared_experts=1, dense_layers=1, **_MLA,
            name="kimi-k2",
        ),
        # Not a published model: a 1.1T GQA model whose 400 experts fit a 10,000-GPU plan (ep=400, dp=25).
        Architecture(
            64, 7168, 56, 163840, 2048, 400, 8, kv_heads=8, head_dim=128, ffn_hidden=18432, shared_experts=1,
            dense_layers=1, name="trillion",
        ),
    )
}  # fmt: skip
