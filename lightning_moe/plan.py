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
      parallelism, allocator/framework overhead, routing imbalance, capacity padding, and the gather buffers of
      ZeRO-3 except for ``"fsdp"`` sharding (``MoEStrategy(data_parallel="fsdp")``, modelled tensor by tensor).
"""

from __future__ import annotations

import dataclasses
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
    tensor_shapes,
)
from lightning_moe.plan_sharding import fsdp_shard_numel, unit_sizes

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
SHARDINGS = ("replicated", "full", "fsdp")
GIB = 1024**3

__all__ = ["ACTIVATIONS", "GATED_ACTIVATIONS", "PRESETS", "Architecture", "Layout", "ParamCounts", "Plan",
           "RankParams", "activation_bytes", "all_to_all_bytes", "check_layout", "count_params", "flops_per_token",
           "fsdp_shard_numel", "gather_bytes", "layer_activation_bytes", "main", "min_ep_that_fits", "params_per_rank",
           "plan", "state_bytes", "tensor_shapes", "valid_eps"]


@dataclass(frozen=True)
class Layout:
    """How the model is spread over GPUs and trained.

    Args:
        gpus: Number of GPUs.
        gpu_memory: Memory per GPU in bytes (the CLI takes GiB).
        ep: Expert-parallel size: each GPU holds ``experts / ep`` experts of every MoE layer.
        dp: Expert-data-parallel size (copies of each expert); default ``gpus // ep``; must equal it.
        dense_sharding: Non-expert weights, grads and optimizer states ``"replicated"`` (DDP), ``"full"``
            (ZeRO-3 over all GPUs, an even split of all of them) or ``"fsdp"`` (FSDP2 as
            ``MoEStrategy(data_parallel="fsdp")`` shards: tensor by tensor, see :func:`fsdp_shard_numel`, plus
            the unsharded units in flight, see :func:`gather_bytes`).
        expert_sharding: ``"replicated"`` (default: every holder keeps its experts whole), ``"full"`` (expert
            weights, grads and states also sharded over the ``dp`` group; memory then no longer depends on
            ``ep``, only communication does) or ``"fsdp"`` (the same, as the strategy does it: each stacked
            expert tensor on its first dim after the expert dim that ``dp`` divides).
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
    """Exact parameter counts of one rank (by default rank 0, the largest when a shard does not divide evenly).

    Attributes:
        local_experts: Routed experts per MoE layer on the rank, ``experts // ep``.
        expert: Routed-expert parameters the rank materialises, ``moe_layers * local_experts * per_expert``.
        dense: Non-expert parameters the rank materialises: all of them (``total - routed_experts``).
        expert_stored: Expert parameters kept between steps: ``expert``, or ``ceil(expert / dp)`` when
            ``expert_sharding="full"`` (``expert / dp`` exactly with ``"fsdp"``).
        dense_stored: ``dense``, ``ceil(dense / gpus)`` when ``dense_sharding="full"``, or this rank's share of
            every tensor with ``"fsdp"`` (:func:`fsdp_shard_numel`).
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


def params_per_rank(arch: Architecture, layout: Layout, rank: int = 0) -> RankParams:
    """Exact per-rank parameter counts (see :class:`RankParams`).

    Args:
        arch: The model.
        layout: The layout.
        rank: Global rank (matters for ``"fsdp"`` sharding only, where shards can be uneven).

    Returns:
        The counts of one rank.

    Raises:
        ValueError: If the layout cannot host the model (see :func:`check_layout`), or with ``"fsdp"`` expert
            sharding if ``dp`` does not divide an expert tensor's dim 1.
    """
    dp = check_layout(arch, layout)
    counts = count_params(arch)
    local = arch.experts // layout.ep
    expert = arch.moe_layers * local * counts.per_expert
    dense = counts.total - counts.routed_experts
    expert_stored = -(-expert // dp) if layout.expert_sharding == "full" else expert
    dense_stored = -(-dense // layout.gpus) if layout.dense_sharding == "full" else dense
    if "fsdp" in (layout.dense_sharding, layout.expert_sharding):
        shapes = tensor_shapes(arch)
        if layout.dense_sharding == "fsdp":
            dense_stored = sum(fsdp_shard_numel(s, layout.gpus, rank) for _, s, routed in shapes if not routed)
        if layout.expert_sharding == "fsdp":
            if any(all(size % dp for size in s[1:]) for _, s, routed in shapes if routed):
                raise ValueError(f"Layout: dp={dp} must divide dim or expert_hidden (FSDP2 shards an expert tensor "
                                 "on a dim after the expert dim, evenly) for expert_sharding='fsdp'; pick another ep")
            expert_stored = expert // dp
    return RankParams(local, expert, dense, expert_stored, dense_stored)


def gather_bytes(arch: Architecture, layout: Layout) -> int:
    """Bytes of unsharded FSDP2 units at the step's peak, beyond the activations (``dense_sharding="fsdp"``; 0 else).

    A unit (the root: embeddings, lm head, final norm; each block with its local experts) is unsharded around its
    forward and its backward (``reshard_after_forward=True``, as the strategy shards): FSDP2 copies it out of a
    flat all-gather output into storage padded to every rank's shard (a tensor of ``n`` rows sharded on dim 0
    takes ``gpus * ceil(n / gpus)`` rows, far more than ``n`` when ``n < gpus``). This walks the step unit by
    unit, as measured on CPU (``tests/test_fsdp.py``, ``examples/trillion_plan.py``):

    * forward, block ``i``: the root unsharded with its all-gather output (both held through the forward), the
      activations of the blocks before, block ``i`` and its all-gather output;
    * backward, block ``i``: the root unsharded and its gradient, the activations of blocks ``0..i`` plus block
      ``i``'s again as their gradients (and, with recomputation, one block's activations), block ``i`` unsharded
      with the buffer it (or the next, prefetched) arrives in, and its gradient;

    and returns the largest total minus :func:`activation_bytes`.

    Args:
        arch: The model.
        layout: The layout.

    Returns:
        Bytes (``total_bytes`` = states + activations + this).
    """
    if layout.dense_sharding != "fsdp":
        return 0
    sizes = unit_sizes(arch, layout.ep, layout.gpus)
    w, g = DTYPE_BYTES[layout.weight_dtype], DTYPE_BYTES[layout.grad_dtype]
    root, root_p = sizes[""]
    blocks = [sizes[f"blocks.{i}"] for i in range(arch.layers)]
    t, p = layout.micro_batch * layout.seq_len, DTYPE_BYTES[layout.act_dtype]
    stored = [layer_activation_bytes(arch, layout, arch.is_moe_layer(i)) for i in range(arch.layers)]
    if layout.activation_checkpointing:  # block inputs kept, one block's activations recomputed at a time
        stored, recompute = [t * p * arch.dim] * arch.layers, max(stored)
    else:
        recompute = 0
    output = t * (p * arch.dim + 4 * arch.vocab)
    live = [2 * root_p * w + sum(stored[:i]) + 2 * padded * w for i, (_, padded) in enumerate(blocks)]  # forward
    live.append(2 * root_p * w + sum(stored) + output)  # backward of the head: the root arriving again
    for i, (numel, padded) in enumerate(blocks):  # backward
        live.append(root_p * w + root * g + sum(stored[: i + 1]) + stored[i] + recompute + 2 * padded * w + numel * g)
    return max(max(live) - activation_bytes(arch, layout), 0)


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


def state_bytes(arch: Architecture, layout: Layout, rank: int = 0) -> tuple[int, int, int]:
    """Per-GPU bytes of weights, gradients and Adam states (2 states, plus fp32 master weights if narrower).

    Args:
        arch: The model.
        layout: The layout.
        rank: Global rank (see :func:`params_per_rank`).

    Returns:
        ``(weights, grads, optimizer)`` bytes of :attr:`RankParams.stored` parameters.

    Raises:
        ValueError: If the layout cannot host the model (see :func:`check_layout`).
    """
    n, w = params_per_rank(arch, layout, rank).stored, DTYPE_BYTES[layout.weight_dtype]
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
        try:
            total = sum(state_bytes(arch, candidate)) + activation_bytes(arch, candidate)
        except ValueError:  # "fsdp" expert sharding needs dp to divide an expert dim
            continue
        if total + gather_bytes(arch, candidate) <= layout.gpu_memory:
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
    gather_bytes: int = 0
    rank: int = 0

    def to_dict(self) -> dict:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Human-readable two-column table."""
        rows = {"model": self.name, "layout": f"{self.gpus} GPUs = ep {self.ep} x dp {self.dp}"}
        for f in ("total_params", "active_params", "expert_params_per_gpu", "dense_params_per_gpu"):
            rows[f] = f"{getattr(self, f) / 1e9:,.3f} B ({getattr(self, f):,})"
        rows["flops_per_token"] = f"{self.flops_per_token / 1e9:,.2f} GFLOP forward, x3 = training"
        if self.rank:
            rows["layout"] += f", rank {self.rank}"
        for f in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "total_bytes", "gpu_memory"):
            rows[f] = f"{getattr(self, f) / GIB:,.2f} GiB"
        if self.gather_bytes:
            rows["gather_bytes"] = f"{self.gather_bytes / GIB:,.2f} GiB (FSDP units in flight)"
        rows["all_to_all_bytes"] = f"{self.all_to_all_bytes / GIB:,.2f} GiB per step"
        rows["fits"] = "yes" if self.fits else "NO"
        rows["min_ep_that_fits"] = str(self.min_ep_that_fits)
        return "\n".join(f"{k:<22} {v}" for k, v in rows.items())


def plan(arch: Architecture, layout: Layout, rank: int = 0) -> Plan:
    """Plan a training run.

    Args:
        arch: The model.
        layout: The layout.
        rank: The global rank whose figures to give (they differ only where ``"fsdp"`` shards are uneven).

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
    share, counts = params_per_rank(arch, layout, rank), count_params(arch)
    weights, grads, optim = state_bytes(arch, layout, rank)
    gather = gather_bytes(arch, layout)
    total = weights + grads + optim + (acts := activation_bytes(arch, layout)) + gather
    fwd = flops_per_token(arch, layout.seq_len)
    return Plan(
        arch.name, layout.gpus, layout.ep, layout.gpus // layout.ep, counts.total, counts.active, fwd, 3 * fwd,
        share.expert_stored, share.dense_stored, weights, grads, optim, acts, total, layout.gpu_memory,
        all_to_all_bytes(arch, layout), total <= layout.gpu_memory, min_ep_that_fits(arch, layout), gather, rank,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m lightning_moe.plan --help``; :mod:`lightning_moe.plan_cli`).

    Args:
        argv: Arguments; default ``sys.argv[1:]``.

    Returns:
        Exit code: 0, or 2 on an invalid architecture or layout (message on stderr).
    """
    from lightning_moe.plan_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
