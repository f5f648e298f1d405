"""Capacity planner for Mixture-of-Experts transformers (stdlib only).

:func:`plan` turns an :class:`~lightning_moe.architecture.Architecture` and a :class:`Layout` into parameter
counts, FLOPs per token, per-GPU memory, all-to-all traffic, whether it fits and the smallest expert-parallel size
that fits. CLI: ``python -m lightning_moe.plan --preset mixtral-8x7b --gpus 8 --gpu-memory 80 --ep 8 [--json]``.
The model side (:class:`Architecture`, :func:`count_params`, :data:`PRESETS`, the counting conventions) is in
:mod:`lightning_moe.architecture` and importable from here too.

Conventions:
    * ``active_params`` as in :mod:`lightning_moe.architecture`: everything one token touches, embeddings included.
    * Parallelism is expert x data parallelism only: every GPU runs its own micro-batch, non-expert ("dense")
      weights are data-parallel over all ``gpus``, each expert sits on one GPU of every EP group of ``ep`` GPUs
      and is replicated over its ``dp = gpus / ep`` expert-data-parallel group. Not modelled: tensor/pipeline
      parallelism, ZeRO-3 gather buffers, allocator/framework overhead, routing imbalance, capacity padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

# The model side (what the model is, its parameter count, the presets) lives in architecture.py; re-exported here.
from lightning_moe.architecture import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    PRESETS,
    Architecture,
    ParamCounts,
    count_params,
)

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
SHARDINGS = ("replicated", "full")
GIB = 1024**3

__all__ = ["ACTIVATIONS", "GATED_ACTIVATIONS", "PRESETS", "Architecture", "Layout", "ParamCounts", "Plan",
           "RankParams", "activation_bytes", "all_to_all_bytes", "check_layout", "count_params", "flops_per_token",
           "layer_activation_bytes", "main", "min_ep_that_fits", "params_per_rank", "plan", "state_bytes",
           "valid_eps"]


@dataclass(frozen=True)
class Layout:
    """How the model is spread over GPUs and trained.

    Args:
        gpus: Number of GPUs.
        gpu_memory: Memory per GPU in bytes (the CLI takes GiB).
        ep: Expert-parallel size: each GPU holds ``experts / ep`` experts of every MoE layer.
        dp: Expert-data-parallel size (copies of each expert); default ``gpus // ep``; must equal it.
        dense_sharding: Non-expert weights, grads and optimizer states ``"replicated"`` (DDP) or ``"full"``
            (ZeRO-3 / FSDP over all GPUs).
        expert_sharding: ``"replicated"`` (default: every holder keeps its experts whole) or ``"full"`` (expert
            weights, grads and states also sharded over the ``dp`` group; memory then no longer depends on
            ``ep``, only communication does).
        weight_dtype: Precision of the stored weights.
        grad_dtype: Precision of the gradients.
        optim_dtype: Precision of the two Adam states.
        master_weights: Keep fp32 master weights when ``weight_dtype`` is narrower than fp32.
        act_dtype: Precision of activations and of the all-to-all payload.
        micro_batch: Sequences per GPU per step.
        seq_len: Tokens per sequence.
        activation_checkpointing: Recompute each block in backward, storing only block inputs.
        flash_attention: An attention kernel that never stores the ``s x s`` scores.

    Raises:
        ValueError: On an unknown dtype or sharding or a non-positive size, naming the field and the fix.
    """

    gpus: int
    gpu_memory: int
    ep: int = 1
    dp: int | None = None
    dense_sharding: str = "full"
    expert_sharding: str = "replicated"
    weight_dtype: str = "bf16"
    grad_dtype: str = "fp32"
    optim_dtype: str = "fp32"
    master_weights: bool = True
    act_dtype: str = "bf16"
    micro_batch: int = 1
    seq_len: int = 4096
    activation_checkpointing: bool = False
    flash_attention: bool = False

    def __post_init__(self) -> None:
        for f in ("gpus", "gpu_memory", "ep", "micro_batch", "seq_len") + (("dp",) if self.dp is not None else ()):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"Layout: {f}={getattr(self, f)!r} must be a positive integer; set {f}")
        choices: dict[str, tuple[str, ...]] = {"dense_sharding": SHARDINGS, "expert_sharding": SHARDINGS}
        choices.update({f: tuple(DTYPE_BYTES) for f in ("weight_dtype", "grad_dtype", "optim_dtype", "act_dtype")})
        for f, allowed in choices.items():
            if getattr(self, f) not in allowed:
                raise ValueError(f"Layout: {f}={getattr(self, f)!r} unknown; pick one of {list(allowed)}")


def valid_eps(arch: Architecture, gpus: int) -> list[int]:
    """Expert-parallel sizes dividing both ``arch.experts`` and ``gpus``, ascending."""
    return [d for d in range(1, arch.experts + 1) if arch.experts % d == 0 and gpus % d == 0]


def check_layout(arch: Architecture, layout: Layout) -> int:
    """Check that ``layout`` can host ``arch``.

    Args:
        arch: The model.
        layout: The layout.

    Returns:
        The expert-data-parallel size ``dp = gpus // ep``.

    Raises:
        ValueError: If ``ep`` does not divide ``experts`` or ``gpus``, or ``dp * ep != gpus``.
    """
    ep, gpus = layout.ep, layout.gpus
    if arch.experts % ep:
        raise ValueError(f"Layout: ep={ep} must divide experts={arch.experts}; pick ep in {valid_eps(arch, gpus)}")
    if gpus % ep:
        raise ValueError(f"Layout: ep={ep} must divide gpus={gpus}; pick ep in {valid_eps(arch, gpus)}")
    dp = gpus // ep if layout.dp is None else layout.dp
    if dp * ep != gpus:
        raise ValueError(f"Layout: dp*ep must equal gpus, got dp={dp} * ep={ep} != gpus={gpus}; set dp={gpus // ep}")
    return dp



@dataclass(frozen=True)
class RankParams:
    """Exact parameter counts of one rank (the largest rank when a shard does not divide evenly).

    Attributes:
        local_experts: Routed experts per MoE layer on the rank, ``experts // ep``.
        expert: Routed-expert parameters the rank materialises, ``moe_layers * local_experts * per_expert``.
        dense: Non-expert parameters the rank materialises: all of them (``total - routed_experts``).
        expert_stored: Expert parameters kept between steps: ``expert``, or ``ceil(expert / dp)`` when
            ``expert_sharding="full"``.
        dense_stored: ``dense``, or ``ceil(dense / gpus)`` when ``dense_sharding="full"``.
    """

    local_experts: int
    expert: int
    dense: int
    expert_stored: int
    dense_stored: int

    @property
    def materialised(self) -> int:
        """Parameters of one rank's unsharded module: local experts plus all dense weights."""
        return self.expert + self.dense

    @property
    def stored(self) -> int:
        """Parameters one rank keeps between steps."""
        return self.expert_stored + self.dense_stored


def params_per_rank(arch: Architecture, layout: Layout) -> RankParams:
    """Exact per-rank parameter counts (see :class:`RankParams`).

    Args:
        arch: The model.
        layout: The layout.

    Returns:
        The counts of one rank.

    Raises:
        ValueError: If the layout cannot host the model (see :func:`check_layout`).
    """
    dp = check_layout(arch, layout)
    counts = count_params(arch)
    local = arch.experts // layout.ep
    expert = arch.moe_layers * local * counts.per_expert
    dense = counts.total - counts.routed_experts
    expert_stored = -(-expert // dp) if layout.expert_sharding == "full" else expert
    dense_stored = -(-dense // layout.gpus) if layout.dense_sharding == "full" else dense
    return RankParams(local, expert, dense, expert_stored, dense_stored)


def flops_per_token(arch: Architecture, seq_len: int) -> int:
    """Forward FLOPs per token: ``2*matmul_active + layers * 2*seq*heads*(qk_head_dim + v_head_dim)``.

    The second term is ``Q K^T`` and ``softmax V`` over the whole (non-causal) context, i.e.
    ``2*2*layers*seq*heads*head_dim`` for standard attention; causal kernels skip about half. Training is 3x
    (forward + backward); recomputation is extra hardware work, not counted.

    Args:
        arch: The model.
        seq_len: Sequence length.

    Returns:
        Forward FLOPs per token.
    """
    heads, _, head_dim, v_head_dim = arch.attention_dims
    scores = arch.layers * 2 * seq_len * heads * (head_dim + arch.rope_head_dim + v_head_dim)
    return 2 * count_params(arch).matmul_active + scores


def layer_activation_bytes(arch: Architecture, layout: Layout, moe: bool) -> int:
    """Bytes one block stores for backward, per GPU and micro-batch, without recomputation.

    Generalises Korthikanti et al. 2022 (``sbh(34 + 5as/h)`` for a GPT block with 16-bit activations, dropout,
    ``4h`` GELU MLP; reproduced exactly in that case). With ``T = s*b`` tokens, ``p`` activation bytes,
    ``m = 3`` for a gated FFN (gate, up, their product) or ``2`` (activation input and output):

    * attention ``T*p*(dim + q + k + v + o_in)`` (input, Q, K, V, output-projection input, MLA latents), plus
      scores ``b*heads*s^2*p`` (softmax output; with dropout also its mask and output, ``2p + 1`` in all) or,
      with flash attention, ``4*T*heads`` (fp32 log-sum-exp);
    * norms ``2*T*p*dim``; with dropout a 1-byte mask per block output, ``2*T*dim``;
    * dense FFN ``T*p*(dim + m*ffn_hidden)``;
    * MoE FFN ``T*(p*dim + 4*experts + p*top_k*(2*dim + m*expert_hidden) + p*shared_experts*m*expert_hidden)``:
      input, fp32 router logits, dispatched tokens and expert outputs before the combine, expert hiddens.

    Args:
        arch: The model.
        layout: Supplies micro-batch, sequence length, activation dtype and the attention kernel.
        moe: Whether the block's FFN is MoE.

    Returns:
        Bytes.
    """
    b, s, p = layout.micro_batch, layout.seq_len, DTYPE_BYTES[layout.act_dtype]
    (h, kv, hd, vd), t, d = arch.attention_dims, b * s, arch.dim
    if arch.mla:
        qk = h * (hd + arch.rope_head_dim)
        widths = d + 2 * qk + 2 * h * vd + arch.q_lora_rank + arch.kv_lora_rank + arch.rope_head_dim
    else:
        widths = d + h * hd + kv * (hd + vd) + h * vd
    scores = 4 * t * h if layout.flash_attention else b * h * s * s * (p + (p + 1) * arch.dropout)
    attention = t * p * widths + scores + 2 * t * p * d + 2 * t * d * arch.dropout
    if not moe:
        m = 3 if arch.dense_activation in GATED_ACTIVATIONS else 2
        return attention + t * p * (d + m * arch.ffn_hidden)
    m, fe = (3 if arch.activation in GATED_ACTIVATIONS else 2), arch.expert_hidden
    routed = p * arch.top_k * (2 * d + m * fe)
    return attention + t * (p * d + 4 * arch.experts + routed + p * arch.shared_experts * m * fe)


def activation_bytes(arch: Architecture, layout: Layout) -> int:
    """Activation bytes per GPU for one micro-batch.

    Without checkpointing, :func:`layer_activation_bytes` summed over the blocks; with it, ``layers*T*p*dim``
    (block inputs) plus the largest block's full activations (recomputed one block at a time). Both add the
    output ``T*(p*dim + 4*vocab)`` (final norm output, fp32 logits).

    Args:
        arch: The model.
        layout: The layout.

    Returns:
        Bytes.
    """
    t, p = layout.micro_batch * layout.seq_len, DTYPE_BYTES[layout.act_dtype]
    dense = layer_activation_bytes(arch, layout, moe=False) if arch.dense_ffn_layers else 0
    moe = layer_activation_bytes(arch, layout, moe=True) if arch.moe_layers else 0
    output = t * (p * arch.dim + 4 * arch.vocab)
    if layout.activation_checkpointing:
        return arch.layers * t * p * arch.dim + max(dense, moe) + output
    return arch.dense_ffn_layers * dense + arch.moe_layers * moe + output


def all_to_all_bytes(arch: Architecture, layout: Layout) -> int:
    """Bytes each GPU sends through all-to-all per training step (one micro-batch), rounded down.

    ``moe_layers * micro_batch*seq*top_k*dim*p * 2 (dispatch, combine) * passes * (ep - 1)/ep``: ``passes`` is 2
    (forward, backward), 3 with activation checkpointing (the forward runs again); ``(ep - 1)/ep`` of the tokens
    go to other GPUs (balanced routing).

    Args:
        arch: The model.
        layout: The layout.

    Returns:
        Bytes.
    """
    passes = 3 if layout.activation_checkpointing else 2
    per_layer = layout.micro_batch * layout.seq_len * arch.top_k * arch.dim * DTYPE_BYTES[layout.act_dtype]
    return arch.moe_layers * per_layer * 2 * passes * (layout.ep - 1) // layout.ep


def state_bytes(arch: Architecture, layout: Layout) -> tuple[int, int, int]:
    """Per-GPU bytes of weights, gradients and Adam states (2 states, plus fp32 master weights if narrower).

    Args:
        arch: The model.
        layout: The layout.

    Returns:
        ``(weights, grads, optimizer)`` bytes of :attr:`RankParams.stored` parameters.

    Raises:
        ValueError: If the layout cannot host the model (see :func:`check_layout`).
    """
    n, w = params_per_rank(arch, layout).stored, DTYPE_BYTES[layout.weight_dtype]
    master = 4 if layout.master_weights and w < 4 else 0
    return n * w, n * DTYPE_BYTES[layout.grad_dtype], n * (2 * DTYPE_BYTES[layout.optim_dtype] + master)


def min_ep_that_fits(arch: Architecture, layout: Layout) -> int | None:
    """Smallest ``ep`` in :func:`valid_eps` whose per-GPU total fits ``gpu_memory``, other fields unchanged.

    Args:
        arch: The model.
        layout: The layout; its ``ep`` and ``dp`` are ignored.

    Returns:
        That ``ep``, or None when none fits.
    """
    for ep in valid_eps(arch, layout.gpus):
        candidate = dataclasses.replace(layout, ep=ep, dp=None)
        if sum(state_bytes(arch, candidate)) + activation_bytes(arch, candidate) <= layout.gpu_memory:
            return ep
    return None


@dataclass(frozen=True)
class Plan:
    """Result of :func:`plan`: ``*_bytes`` and ``*_per_gpu`` are per GPU, FLOPs per token."""

    name: str
    gpus: int
    ep: int
    dp: int
    total_params: int
    active_params: int
    flops_per_token: int
    train_flops_per_token: int
    expert_params_per_gpu: int
    dense_params_per_gpu: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    gpu_memory: int
    all_to_all_bytes: int
    fits: bool
    min_ep_that_fits: int | None

    def to_dict(self) -> dict:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Human-readable two-column table."""
        rows = {"model": self.name, "layout": f"{self.gpus} GPUs = ep {self.ep} x dp {self.dp}"}
        for f in ("total_params", "active_params", "expert_params_per_gpu", "dense_params_per_gpu"):
            rows[f] = f"{getattr(self, f) / 1e9:,.3f} B ({getattr(self, f):,})"
        rows["flops_per_token"] = f"{self.flops_per_token / 1e9:,.2f} GFLOP forward, x3 = training"
        for f in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "total_bytes", "gpu_memory"):
            rows[f] = f"{getattr(self, f) / GIB:,.2f} GiB"
        rows["all_to_all_bytes"] = f"{self.all_to_all_bytes / GIB:,.2f} GiB per step"
        rows["fits"] = "yes" if self.fits else "NO"
        rows["min_ep_that_fits"] = str(self.min_ep_that_fits)
        return "\n".join(f"{k:<22} {v}" for k, v in rows.items())


def plan(arch: Architecture, layout: Layout) -> Plan:
    """Plan a training run.

    Args:
        arch: The model.
        layout: The layout.

    Returns:
        The plan.

    Raises:
        ValueError: If the layout cannot host the model (see :func:`check_layout`).

    Example:
        >>> layout = Layout(gpus=64, gpu_memory=80 * GIB, ep=8, expert_sharding="full")
        >>> result = plan(PRESETS["mixtral-8x7b"], layout)
        >>> result.fits, result.dp, round(result.total_bytes / GIB, 1)
        (True, 8, 76.3)
    """
    rank, counts = params_per_rank(arch, layout), count_params(arch)
    weights, grads, optim = state_bytes(arch, layout)
    total = weights + grads + optim + (acts := activation_bytes(arch, layout))
    fwd = flops_per_token(arch, layout.seq_len)
    return Plan(
        arch.name, layout.gpus, layout.ep, layout.gpus // layout.ep, counts.total, counts.active, fwd, 3 * fwd,
        rank.expert_stored, rank.dense_stored, weights, grads, optim, acts, total, layout.gpu_memory,
        all_to_all_bytes(arch, layout), total <= layout.gpu_memory, min_ep_that_fits(arch, layout),
    )  # fmt: skip


_ARCH_FIELDS = [f.name for f in dataclasses.fields(Architecture) if f.name != "name"]
_LAYOUT_FIELDS = [f.name for f in dataclasses.fields(Layout)]
_REQUIRED = ("layers", "dim", "heads", "vocab", "expert_hidden", "experts", "top_k")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_moe.plan", description="Capacity planner for MoE models.")
    p.add_argument("--preset", choices=list(PRESETS), help="start from a published architecture")
    p.add_argument("--list-presets", action="store_true", help="print the presets with their counts and exit")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    group = p.add_argument_group("architecture (overrides the preset; see Architecture)")
    for name in _ARCH_FIELDS:
        flag, default = "--" + name.replace("_", "-"), getattr(Architecture, name, None)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif name in ("activation", "dense_activation"):
            group.add_argument(flag, choices=ACTIVATIONS, default=None)
        else:
            group.add_argument(flag, type=int, default=None)
    group = p.add_argument_group("layout (see Layout)")
    group.add_argument("--gpus", type=int, default=8)
    group.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    group.add_argument("--ep", type=int, default=None, help="default: smallest that fits, else largest valid")
    group.add_argument("--dp", type=int, default=None, help="default: gpus // ep")
    for name in _LAYOUT_FIELDS[4:]:
        flag, default = "--" + name.replace("_", "-"), getattr(Layout, name)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, int):
            group.add_argument(flag, type=int, default=default)
        else:
            allowed = SHARDINGS if name.endswith("sharding") else list(DTYPE_BYTES)
            group.add_argument(flag, choices=allowed, default=default)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m lightning_moe.plan --help``).

    Args:
        argv: Arguments; default ``sys.argv[1:]``.

    Returns:
        Exit code: 0, or 2 on an invalid architecture or layout (message on stderr).
    """
    args = _parser().parse_args(argv)
    if args.list_presets:
        for name, arch in PRESETS.items():
            c = count_params(arch)
            print(f"{name:<16} {c.total / 1e9:9.1f}B total {c.active / 1e9:7.1f}B active")
        return 0
    try:
        fields = dataclasses.asdict(PRESETS[args.preset]) if args.preset else {}
        overrides = {k: getattr(args, k) for k in _ARCH_FIELDS if getattr(args, k) is not None}
        if args.preset and overrides:
            fields["name"] = f"{args.preset} (modified)"
        fields.update(overrides)
        missing = ", ".join("--" + k.replace("_", "-") for k in _REQUIRED if k not in fields)
        if missing:
            raise ValueError(f"Architecture: {missing} required without --preset; pass them or pick a --preset")
        arch = Architecture(**fields)
        layout = Layout(**{k: getattr(args, k) for k in _LAYOUT_FIELDS if k not in ("gpu_memory", "ep")},
                        gpu_memory=int(args.gpu_memory * GIB), ep=args.ep or 1)  # fmt: skip
        if args.ep is None:
            ep = min_ep_that_fits(arch, layout) or valid_eps(arch, layout.gpus)[-1]
            layout = dataclasses.replace(layout, ep=ep)
        result = plan(arch, layout)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
