"""A decoder-only transformer with dense or Mixture-of-Experts feed-forward blocks, built from an Architecture.

The one transformer of the project: the dry run (:mod:`lightning_moe.dry_run`) builds it at any size on the meta
device, the examples train it on bytes, tests use it small. Without positions its parameter count equals
:func:`~lightning_moe.architecture.count_params` exactly (:func:`build_model` checks)::

    tokens [B, S] -> embed (+ learned positions) -> layers x Block -> RMSNorm -> lm head -> logits [B, S, V]
    Block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is a DenseFFN or an MoE (Architecture.is_moe_layer)

Attention is causal grouped-query attention through ``scaled_dot_product_attention``; no biases anywhere;
no positional encoding unless ``max_seq_len`` is given (NoPE: a causal decoder infers positions from the mask).

Shape legend: B batch, S sequence, D model width, V vocabulary, Q query heads, G key/value heads,
A head width, F dense FFN hidden width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.architecture import GATED_ACTIVATIONS, Architecture, count_params
from lightning_moe.nn.moe import MoE

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
# MoE arguments the Architecture decides; moe_kwargs may set any other (capacity_factor, aux_loss_coef, ...).
_ARCH_MOE_ARGS = ("dim", "num_experts", "top_k", "hidden_dim", "activation", "num_shared_experts", "bias", "expert",
                  "device", "dtype")


class Embedding(nn.Embedding):
    """``nn.Embedding`` initialised ``N(0, 0.02)`` (GPT-2), so a tied lm head starts with near-uniform logits."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class Attention(nn.Module):
    """Causal grouped-query self-attention without biases: ``q, k, v, o`` as the planner counts them."""

    def __init__(self, arch: Architecture, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"bias": False, "device": device, "dtype": dtype}
        self.heads, self.kv_heads, self.head_dim, self.v_head_dim = arch.attention_dims
        self.q = nn.Linear(arch.dim, self.heads * self.head_dim, **factory)
        self.k = nn.Linear(arch.dim, self.kv_heads * self.head_dim, **factory)
        self.v = nn.Linear(arch.dim, self.kv_heads * self.v_head_dim, **factory)
        self.o = nn.Linear(self.heads * self.v_head_dim, arch.dim, **factory)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, _ = x_BSD.shape
        # NOTE: contiguous copies: CPU flash attention's backward on transposed views measured 50x slower.
        q_BQSA = self.q(x_BSD).view(B, S, self.heads, self.head_dim).transpose(1, 2).contiguous()
        k_BGSA = self.k(x_BSD).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2).contiguous()
        v_BGSA = self.v(x_BSD).view(B, S, self.kv_heads, self.v_head_dim).transpose(1, 2).contiguous()
        # NOTE: on CPU (and CUDA) this is a flash kernel: it keeps q, k, v, the output and an fp32
        # log-sum-exp per head and token for backward, never the S x S scores (planner: flash_attention).
        out_BQSA = F.scaled_dot_product_attention(
            q_BQSA, k_BGSA, v_BGSA, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.o(out_BQSA.transpose(1, 2).reshape(B, S, self.heads * self.v_head_dim))


class DenseFFN(nn.Module):
    """Feed-forward block ``w2(act(w1 x))``, or ``w2(silu(w1 x) * w3 x)`` for swiglu (upcycle finds both)."""

    def __init__(self, dim: int, hidden: int, activation: str, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"bias": False, "device": device, "dtype": dtype}
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden, **factory)
        self.w3 = nn.Linear(dim, hidden, **factory) if activation == "swiglu" else None
        self.w2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x_BSD: Tensor) -> Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x_BSD)) * self.w3(x_BSD))
        return self.w2(_ACTIVATIONS[self.activation](self.w1(x_BSD)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))`` (dense or MoE)."""

    def __init__(self, arch: Architecture, moe: bool, moe_kwargs: dict[str, Any], device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.attn_norm = nn.RMSNorm(arch.dim, **factory)
        self.attn = Attention(arch, **factory)
        self.ffn_norm = nn.RMSNorm(arch.dim, **factory)
        self.ffn: nn.Module
        if moe:
            self.ffn = MoE(arch.dim, arch.experts, arch.top_k, hidden_dim=arch.expert_hidden,
                           activation=arch.activation, num_shared_experts=arch.shared_experts, **moe_kwargs, **factory)
        else:
            self.ffn = DenseFFN(arch.dim, arch.ffn_hidden, arch.dense_activation or arch.activation, **factory)

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class Transformer(nn.Module):
    """Decoder-only transformer of ``arch``: ``tokens [B, S] -> logits [B, S, V]``.

    Args:
        arch: The architecture. MLA, qk-norm, biases and the activations ``geglu``/``reglu`` are counted by the
            planner but not built here.
        max_seq_len: Learn absolute position embeddings for up to this many tokens (``max_seq_len * dim`` more
            parameters than the planner counts); default None: no positional encoding.
        moe_kwargs: Further :class:`~lightning_moe.MoE` arguments of every MoE layer (``capacity_factor``,
            ``aux_loss_coef``, ``router``, ...); not those the architecture decides (width, experts, activation).
        device: Where to create parameters; ``"meta"`` allocates nothing at any size.
        dtype: Parameter dtype (routers still compute in float32).

    Raises:
        ValueError: On an architecture feature that is not built, or a ``moe_kwargs`` key the architecture sets.

    Example:
        >>> arch = Architecture(layers=2, dim=32, heads=4, vocab=256, expert_hidden=64, experts=4, top_k=2)
        >>> model = Transformer(arch)
        >>> model(torch.randint(256, (3, 10))).shape
        torch.Size([3, 10, 256])
        >>> sum(p.numel() for p in model.parameters()) == count_params(arch).total
        True
    """

    def __init__(self, arch: Architecture, max_seq_len: int | None = None, moe_kwargs: dict[str, Any] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_buildable(arch, max_seq_len, moe_kwargs or {})
        self.arch = arch
        self.max_seq_len = max_seq_len
        self.embed = Embedding(arch.vocab, arch.dim, device=device, dtype=dtype)
        self.pos = Embedding(max_seq_len, arch.dim, device=device, dtype=dtype) if max_seq_len else None
        self.blocks = nn.ModuleList(Block(arch, arch.is_moe_layer(i), moe_kwargs or {}, device=device, dtype=dtype)
                                    for i in range(arch.layers))
        self.norm = nn.RMSNorm(arch.dim, device=device, dtype=dtype)
        self.head = nn.Linear(arch.dim, arch.vocab, bias=False, device=device, dtype=dtype)
        if arch.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens_BS: Tensor) -> Tensor:
        """Logits ``[B, S, V]`` of the next token at every position."""
        x_BSD = self.embed(tokens_BS)
        if self.pos is not None:
            if tokens_BS.shape[-1] > self.pos.num_embeddings:
                raise ValueError(f"Transformer: {tokens_BS.shape[-1]} tokens exceed max_seq_len="
                                 f"{self.pos.num_embeddings}; build the model with a larger max_seq_len")
            x_BSD = x_BSD + self.pos.weight[: tokens_BS.shape[-1]]
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return self.head(self.norm(x_BSD))

    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' balancing and z losses from the last forward (zero without MoE layers)."""
        total = torch.zeros((), device=self.norm.weight.device)
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                total = total + block.ffn.aux_loss
        return total


def num_params(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor once (works on meta)."""
    return sum(p.numel() for p in model.parameters())


def build_model(arch: Architecture, device: torch.device | str = "meta", dtype: torch.dtype | None = None
                ) -> Transformer:
    """Build the :class:`Transformer` of ``arch`` (no positions); its parameter count is the planner's.

    Args:
        arch: The architecture (see :class:`Transformer` for what is built).
        device: Where to create parameters; ``"meta"`` (default) allocates nothing at any size.
        dtype: Parameter dtype.

    Returns:
        The model, every MoE layer holding all experts.

    Raises:
        ValueError: On an architecture feature the model does not build, naming the fix.
    """
    model = Transformer(arch, device=device, dtype=dtype)
    built, planned = num_params(model), count_params(arch).total
    if built != planned:
        raise AssertionError(f"build_model: built {built:,} parameters but the planner counts {planned:,}")
    return model


def _check_buildable(arch: Architecture, max_seq_len: int | None, moe_kwargs: dict[str, Any]) -> None:
    unsupported = {"kv_lora_rank": arch.mla, "qk_norm": arch.qk_norm, "bias": arch.bias}
    for field, used in unsupported.items():
        if used:
            raise ValueError(f"Transformer: {field}={getattr(arch, field)!r} is counted by the planner but not "
                             f"built here; pick an Architecture without it")
    for field in ("activation", "dense_activation"):
        if getattr(arch, field) in GATED_ACTIVATIONS and getattr(arch, field) != "swiglu":
            raise ValueError(f"Transformer: {field}={getattr(arch, field)!r} is not built here; "
                             "use swiglu, gelu, relu or silu")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"Transformer: max_seq_len={max_seq_len!r} must be a positive int, or None for no "
                         "positional encoding")
    fixed = sorted(set(moe_kwargs) & set(_ARCH_MOE_ARGS))
    if fixed:
        raise ValueError(f"Transformer: moe_kwargs {fixed} are set by the Architecture; change the Architecture "
                         "instead")
