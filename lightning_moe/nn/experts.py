"""Expert banks: run a batch of tokens already grouped by expert through each expert.

Both banks take ``x_MD`` (the kept assignments, contiguous per expert, in expert order) and
``counts`` (tokens per local expert, a host list) and return ``y_MD`` in the same order.

Shape legend: M kept assignments, D model width, H expert hidden width, E experts held here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import _compat
from lightning_moe.nn.dispatch import expert_output_dtype
from lightning_moe.nn.ops.combine import weighted_combine
from lightning_moe.nn.ops.grouped_mlp import FUSED_ACTIVATIONS, grouped_mlp, routed_mlp

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu", "swiglu_oai")
GATED_ACTIVATIONS = ("swiglu", "swiglu_oai")
# GPT-OSS's defaults for its gated activation (transformers GptOssConfig swiglu_alpha/swiglu_limit).
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0
# [w1, w2, w3, b1, b2] of a bank in the GEMM dtype (None where absent), as the fused kernels take them.
FusedWeights = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]


def activation_function(name: str):
    """The elementwise function of a non-gated activation name (``"gelu" | "relu" | "silu"``)."""
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[name]


def swiglu_oai(gate_CH: Tensor, up_CH: Tensor, alpha: float, limit: float) -> Tensor:
    """GPT-OSS's gated activation: ``(clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g)``, g clamped above at limit.

    The clamps keep activations bounded (no overflow in low precision); the ``+ 1`` lets the up
    projection scale the gate around identity. ``alpha=1``, no clamp and no ``+ 1`` would be SwiGLU.
    """
    gate_CH = gate_CH.clamp(max=limit)
    up_CH = up_CH.clamp(min=-limit, max=limit)
    return (up_CH + 1) * (gate_CH * torch.sigmoid(gate_CH * alpha))


def _grouped_mm_usable(x: Tensor, *weights: Tensor) -> bool:
    # torch._grouped_mm is the CUDA grouped GEMM (one launch for all experts). It wants bf16 and
    # 16-byte aligned rows; everything else, CPU included, takes the per-expert loop, which measured
    # faster than torch's CPU _grouped_mm fallback (benchmarks/moe_layer.py).
    return (
        x.is_cuda
        and _compat.grouped_mm is not None
        and x.dtype == torch.bfloat16
        and all(w.dtype == torch.bfloat16 and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights)
    )


# Below this many multiply-adds per expert GEMM on average (rows x D x H), the per-expert loop's Python and
# dispatch cost exceeds its GEMMs' and torch's CPU grouped GEMM (one C++ loop over the groups) is faster;
# measured fwd+bwd, one thread: 1.26-1.28x at 0.5M and 4M, equal at 17M (dim 128), the loop 1.17x
# faster at 17M (dim 256). ``benchmarks/hf_moe.py`` runs models in that regime.
CPU_GROUPED_MM_MACS = 1 << 23


def _aligned_16(t: Tensor) -> bool:
    # torch's CPU _grouped_mm needs every non-unit stride (and the start) on a 16-byte boundary.
    size = t.element_size()
    return (t.storage_offset() * size) % 16 == 0 and all((st * size) % 16 == 0 for st in t.stride() if st != 1)


def _cpu_grouped_mm_possible(x: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether torch's CPU grouped GEMM can run experts of ``weights`` on rows of ``x`` (eager float32)."""
    return (
        x.device.type == "cpu"
        and _compat.grouped_mm is not None
        and not torch.compiler.is_compiling()  # compiled: the fused custom operator (no graph break)
        and x.dtype == expert_output_dtype(x) == torch.float32  # not under a lower-precision autocast
        and all(w.dtype == torch.float32 and _aligned_16(w) for w in weights)
        and weights[0].shape[-1] % 4 == 0 and x.shape[-1] % 4 == 0  # rows of 16 bytes' multiples
    )


def _cpu_grouped_mm_pays(x: Tensor, rows: int, num_experts: int, weights: Sequence[Tensor]) -> bool:
    """Whether ``rows`` rows of ``x`` should run as torch's CPU grouped GEMM (small experts).

    One rule on the kept rows for every path that runs the bank as rows (routed, rows from a dispatcher's
    sequential exchange), so that they run the same kernel and agree bit for bit; the row input is made
    16-byte aligned where it is not (a gathered copy always is). The overlapped expert-parallel exchange runs
    the fused kernels on its blocks (``distributed/overlap.py``) and agrees to float rounding.
    """
    return (rows > 0 and _cpu_grouped_mm_possible(x, weights)
            and rows * x.shape[-1] * weights[0].shape[-1] < CPU_GROUPED_MM_MACS * num_experts)


class GroupedExperts(nn.Module):
    """``num_experts`` feed-forward experts with stacked weights ``w1 [E, D, H]``, ``w2 [E, H, D]``.

    With ``activation="swiglu"`` a third weight ``w3 [E, D, H]`` gates the hidden layer
    (``silu(x w1) * (x w3)``); ``"swiglu_oai"`` is GPT-OSS's clamped variant (:func:`swiglu_oai`,
    with ``swiglu_alpha`` and ``swiglu_limit``). Each expert runs one GEMM per weight on its
    contiguous slice; on CUDA with bf16, and on CPU for small experts (:data:`CPU_GROUPED_MM_MACS`), the
    slices run as one grouped GEMM.

    The weights may be strided views (e.g. of a Hugging Face ``gate_up_proj``, see
    :func:`lightning_moe.from_hf`): each expert's ``[D, H]`` slice only needs one unit stride, which
    BLAS reads as a transposed operand without a copy.

    Args:
        num_experts: experts held by this module (all of them, or a rank's share under expert
            parallelism, see ``expert_offset``).
        dim: model width D.
        hidden_dim: expert hidden width H.
        activation: ``"gelu" | "relu" | "silu" | "swiglu"``.
        bias: add per-expert biases ``b1 [E, H]``, ``b2 [E, D]`` (upcycled ``nn.Linear`` blocks);
            with ``"swiglu_oai"`` also ``b3 [E, H]`` for the up projection (GPT-OSS). Plain
            ``"swiglu"`` keeps ``b1``/``b2`` only.
        swiglu_alpha: ``"swiglu_oai"`` only: the sigmoid's slope (default 1.702, GPT-OSS).
        swiglu_limit: ``"swiglu_oai"`` only: the clamp (default 7.0, GPT-OSS).

    Example:
        >>> experts = GroupedExperts(4, dim=8, hidden_dim=16)
        >>> experts(torch.randn(6, 8), [1, 2, 0, 3]).shape
        torch.Size([6, 8])
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu",
        bias: bool = False,
        swiglu_alpha: float | None = None,
        swiglu_limit: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation={activation!r} must be one of {ACTIVATIONS}")
        for arg, value in (("swiglu_alpha", swiglu_alpha), ("swiglu_limit", swiglu_limit)):
            if value is not None and activation != "swiglu_oai":
                raise ValueError(f"{name}: {arg}={value!r} applies to activation='swiglu_oai' only; "
                                 f"drop it or use activation='swiglu_oai' (activation={activation!r})")
            if value is not None and not value > 0:
                raise ValueError(f"{name}: {arg}={value!r} must be > 0")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        gated = activation in GATED_ACTIVATIONS
        oai = activation == "swiglu_oai"
        self.swiglu_alpha = (SWIGLU_OAI_ALPHA if swiglu_alpha is None else float(swiglu_alpha)) if oai else None
        self.swiglu_limit = (SWIGLU_OAI_LIMIT if swiglu_limit is None else float(swiglu_limit)) if oai else None
        # Global id of local expert 0; the expert-parallel strategy sets it when it shards.
        self.expert_offset = 0
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory)) if gated else None
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim, **factory)) if bias else None
        self.b3 = nn.Parameter(torch.empty(num_experts, hidden_dim, **factory)) if bias and oai else None
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """``nn.Linear``'s init, expert by expert.

        Args:
            seed: when given, expert ``g`` (global id ``expert_offset + local index``) draws from a
                generator seeded with ``(seed, g)``, so any rank materialises its own experts
                exactly as a single process holding all of them would.
        """
        for local, params in enumerate(self._per_expert_params()):
            generator = None
            if seed is not None and self.w1.device.type != "meta":
                generator = torch.Generator(device=self.w1.device).manual_seed(
                    seed * 1_000_003 + self.expert_offset + local
                )
            for tensor, fan_in in params:
                bound = 1.0 / math.sqrt(fan_in)
                with torch.no_grad():
                    tensor.uniform_(-bound, bound, generator=generator)

    def _per_expert_params(self):
        for e in range(self.num_experts):
            params = [(self.w1[e], self.dim), (self.w2[e], self.hidden_dim)]
            if self.w3 is not None:
                params.append((self.w3[e], self.dim))
            if self.b1 is not None:
                params += [(self.b1[e], self.dim), (self.b2[e], self.hidden_dim)]
            if self.b3 is not None:
                params.append((self.b3[e], self.dim))
            yield params

    def extra_repr(self) -> str:
        oai = f", swiglu_alpha={self.swiglu_alpha}, swiglu_limit={self.swiglu_limit}" if self.swiglu_alpha else ""
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}{oai}"
        )

    def gated(self, gate_CH: Tensor, up_CH: Tensor) -> Tensor:
        """The gated activation of ``"swiglu"`` / ``"swiglu_oai"`` on the two hidden projections."""
        if self.activation == "swiglu_oai":
            return swiglu_oai(gate_CH, up_CH, cast(float, self.swiglu_alpha), cast(float, self.swiglu_limit))
        return F.silu(gate_CH) * up_CH

    def forward(self, x_MD: Tensor, counts: Sequence[int] | Tensor, token_N: Tensor | None = None,
                weights_N: Tensor | None = None) -> Tensor:
        """Run each expert on its slice of ``x_MD``; ``counts[e]`` rows belong to expert e, in order.

        With ``token_N`` and ``weights_N``, the routed form (:meth:`forward_routed`): ``x_MD`` is then the
        tokens ``x_TD``, and the result is combined back per token.
        """
        if len(counts) != self.num_experts:
            raise ValueError(f"{type(self).__name__}: got {len(counts)} counts for {self.num_experts} experts")
        if token_N is not None or weights_N is not None:
            if token_N is None or weights_N is None:
                raise ValueError(f"{type(self).__name__}: pass token_N and weights_N together (the routed form), "
                                 "or neither")
            return self._forward_routed(x_MD, token_N, weights_N, counts)
        # NOTE: host sync when counts is a tensor: the expert GEMMs need their sizes.
        return self._forward_rows(x_MD, counts.tolist() if isinstance(counts, Tensor) else counts)

    def _forward_rows(self, x_MD: Tensor, counts: Sequence[int]) -> Tensor:
        if self.b3 is not None and self.b3.shape[0] != self.w1.shape[0]:
            raise ValueError(f"{type(self).__name__}: b3 holds {self.b3.shape[0]} experts, w1 {self.w1.shape[0]}; "
                             "shard b3 with the other stacked tensors (expert parallelism)")
        if x_MD.shape[0] == 0:
            return _empty_output(x_MD, self.dim, self.parameters())
        weights = [w for w in (self.w1, self.w2, self.w3) if w is not None]
        if self.b1 is None and _grouped_mm_usable(x_MD, *weights):
            return self._forward_grouped_mm(x_MD, counts)
        if self.b1 is None and _cpu_grouped_mm_pays(x_MD, x_MD.shape[0], self.num_experts, weights):
            # The CPU grouped GEMM needs a 16-byte aligned input: a misaligned view is copied once.
            aligned = x_MD if _aligned_16(x_MD) else x_MD.clone(memory_format=torch.contiguous_format)
            return self._forward_grouped_mm(aligned, counts)
        if self._fused(x_MD):
            return grouped_mlp(self._cast(x_MD)[0], counts, *self._cast_weights(x_MD), activation=self.activation)
        return self._forward_loop(x_MD, counts)

    def forward_routed(self, x_TD: Tensor, token_N: Tensor, weights_N: Tensor, counts: Tensor | Sequence[int]
                       ) -> Tensor:
        """Gather, run and combine: per token, the weighted sum of the expert outputs of its rows.

        Equals ``weighted_combine(self(x_TD[token_M], counts), weights_M, token_M, T)`` over the first
        ``M = sum(counts)`` rows; where the fused path applies it runs expert by expert without any ``[M, D]``
        buffer (``nn/ops/grouped_mlp.py``). It goes through the module call, ``self(x_TD, counts, token_N,
        weights_N)``, so forward hooks run as for any forward (pruning's weight masks, FSDP's unsharding).

        Args:
            x_TD: tokens ``[T, D]``.
            token_N: token of each row, rows grouped by expert (``counts[e]`` rows for expert ``e``); rows
                past ``sum(counts)`` (dropped assignments) are ignored.
            weights_N: routing weight of each row.
            counts: rows per expert held here: a LongTensor (read on the host here: the one sync) or host ints.
        """
        return self(x_TD, counts, token_N, weights_N)

    def _forward_routed(self, x_TD: Tensor, token_N: Tensor, weights_N: Tensor, counts: Tensor | Sequence[int]
                        ) -> Tensor:
        weights = [w for w in (self.w1, self.w2, self.w3) if w is not None]
        grouped = False
        if self.b1 is None and _cpu_grouped_mm_possible(x_TD, weights):
            # NOTE: host sync (counts as a tensor): the kept rows decide the kernel, by _forward_rows's rule.
            counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
            grouped = _cpu_grouped_mm_pays(x_TD, sum(counts), self.num_experts, weights)
        if self._fused(x_TD) and not grouped:
            return routed_mlp(self._cast(x_TD)[0], token_N, weights_N, counts, *self._cast_weights(x_TD),
                              activation=self.activation)
        # NOTE: host sync (counts as a tensor): the expert GEMMs need their sizes.
        host = counts.tolist() if isinstance(counts, Tensor) else list(counts)
        token_M, weights_M = token_N[: sum(host)], weights_N[: sum(host)]
        # The row form picks the kernel (the grouped GEMM where it pays); inside this call: hooks ran already.
        y_MD = self._forward_rows(x_TD.index_select(0, token_M), host)
        return weighted_combine(y_MD, weights_M, token_M, x_TD.shape[0])

    def fused_params(self, x: Tensor) -> FusedWeights | None:
        """``[w1, w2, w3, b1, b2]`` in the GEMM dtype for input ``x`` when the fused kernels
        (``nn/ops/expert_kernels.py``) can run this bank on ``x`` outside a module call, else None.

        None too when forward hooks are registered (FSDP's unsharding, pruning's weight masks, ...): they must
        run before the weights are read, so such a bank is only run through its call.
        """
        if _compat.has_forward_hooks(self):
            return None
        return self._cast_weights(x) if self._fused(x) else None

    def _fused(self, x: Tensor) -> bool:
        # The fused per-expert loop (nn/ops/grouped_mlp.py), unless the CUDA grouped GEMM takes the rows.
        weights = [w for w in (self.w1, self.w2, self.w3) if w is not None]
        grouped = _grouped_mm_usable(x, *weights) and self.b1 is None
        return not grouped and self.activation in FUSED_ACTIVATIONS and self.b3 is None

    def _cast_weights(self, x: Tensor) -> FusedWeights:
        # The op runs without autocast: make autocast's choice of GEMM dtype explicit (differentiable casts).
        return cast(FusedWeights, tuple(self._cast(x, self.w1, self.w2, self.w3, self.b1, self.b2)))

    @staticmethod
    def _cast(x: Tensor, *tensors: Tensor | None) -> list:
        dtype = expert_output_dtype(x)
        return [t if t is None or t.dtype == dtype else t.to(dtype) for t in (tensors or (x,))]

    def _forward_loop(self, x_MD: Tensor, counts: Sequence[int]) -> Tensor:
        # NOTE: unbind, not w[e]: the backward of E separate w[e] selects materialises E full-size
        # zero gradients of [E, D, H] (16x slower at 64 experts); unbind's backward is one stack.
        params: list[Sequence[Any]] = [p.unbind(0) if p is not None else [None] * self.num_experts
                                       for p in (self.w1, self.w2, self.w3, self.b1, self.b2, self.b3)]
        outputs = []
        for e, x_CD in enumerate(torch.split(x_MD, list(counts))):
            if x_CD.shape[0] == 0:
                continue
            outputs.append(self._expert(x_CD, *(p[e] for p in params)))
        return torch.cat(outputs)

    def _expert(self, x_CD: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, b1: Tensor | None,
                b2: Tensor | None, b3: Tensor | None = None) -> Tensor:
        h_CH = x_CD @ w1 if b1 is None else torch.addmm(b1, x_CD, w1)
        if w3 is not None:
            h_CH = self.gated(h_CH, x_CD @ w3 if b3 is None else torch.addmm(b3, x_CD, w3))
        else:
            h_CH = activation_function(self.activation)(h_CH)
        return h_CH @ w2 if b2 is None else torch.addmm(b2, h_CH, w2)

    def _forward_grouped_mm(self, x_MD: Tensor, counts: Sequence[int]) -> Tensor:
        # torch's grouped GEMM: one call for all experts (CUDA bf16; on CPU for small experts, _cpu_grouped_mm_pays).
        assert _compat.grouped_mm is not None  # _grouped_mm_usable / _cpu_grouped_mm_pays checked it
        offsets = torch.tensor(counts, device=x_MD.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        h_MH = _compat.grouped_mm(x_MD, self.w1, offs=offsets)
        if self.w3 is not None:
            h_MH = self.gated(h_MH, _compat.grouped_mm(x_MD, self.w3, offs=offsets))
        else:
            h_MH = activation_function(self.activation)(h_MH)
        return _contiguous_grad(_compat.grouped_mm(h_MH, self.w2, offs=offsets))


def _contiguous_grad(y: Tensor) -> Tensor:
    """``y``, its gradient made contiguous on the way back.

    torch's grouped GEMM backward rejects gradients with zero strides (``y.sum().backward()`` sends an
    expanded one: "Invalid strides/sizes"). A tensor hook, not a custom Function: ``y`` stays an ordinary
    tensor (a Function's output that is its input is a view, which in-place edits may not touch). Free
    when the gradient is already contiguous.
    """
    if y.requires_grad and not torch.compiler.is_compiling():
        y.register_hook(Tensor.contiguous)
    return y


class TemplateExperts(nn.Module):
    """Experts that are copies of any user module mapping ``[*, D] -> [*, D]``.

    Each copy is re-initialised (``reset_parameters`` on every submodule that has it) so experts
    start different, unless ``reinit=False`` (upcycling keeps the dense weights). Runs a loop over
    modules: slower than :class:`GroupedExperts`, but any architecture works.

    Example:
        >>> experts = TemplateExperts(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), 3)
        >>> experts(torch.randn(5, 8), [2, 0, 3]).shape
        torch.Size([5, 8])
    """

    def __init__(self, template: nn.Module, num_experts: int, reinit: bool = True) -> None:
        super().__init__()
        if not isinstance(template, nn.Module):
            raise ValueError(f"{type(self).__name__}: expert={type(template).__name__} must be an nn.Module")
        self.num_experts = num_experts
        self.expert_offset = 0
        self.experts = nn.ModuleList(copy.deepcopy(template) for _ in range(num_experts))
        if reinit:
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-initialise every expert; with ``seed``, expert g draws from ``(seed, g)`` (global id)."""
        for local, expert in enumerate(self.experts):
            if seed is None:
                _reset_all(expert)
                continue
            with torch.random.fork_rng(devices=[]):  # a seeded reset leaves the global RNG as it was
                torch.manual_seed(seed * 1_000_003 + self.expert_offset + local)
                _reset_all(expert)

    def forward(self, x_MD: Tensor, counts: Sequence[int]) -> Tensor:
        if len(counts) != self.num_experts:
            raise ValueError(f"{type(self).__name__}: got {len(counts)} counts for {self.num_experts} experts")
        slices = torch.split(x_MD, list(counts))
        outputs = [expert(x_CD) for expert, x_CD in zip(self.experts, slices, strict=True) if x_CD.shape[0] > 0]
        if not outputs:
            return _empty_output(x_MD, x_MD.shape[-1], self.parameters())
        return torch.cat(outputs)


def _reset_all(module: nn.Module) -> None:
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def _empty_output(x_MD: Tensor, dim: int, params) -> Tensor:
    # No token reached any expert: still tie every weight into the graph (with zero gradient) so
    # backward hooks and DDP's reducer see the parameters used, as in a step with tokens. The dtype
    # is the one the expert GEMMs would give (autocast's), not the input's: it must not depend on data.
    anchor = sum((p.sum() * 0 for p in params), x_MD.new_zeros(()))
    dtype = expert_output_dtype(x_MD)
    return x_MD.new_zeros((0, dim), dtype=dtype) + anchor.to(dtype)
