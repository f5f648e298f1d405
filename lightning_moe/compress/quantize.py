"""int8 weight-only quantization of expert banks (per output channel, dequantized on the fly or int8 GEMM).

Shape legend (the package's, see :mod:`lightning_moe.nn`): E experts held here, I / O input / output width of
one expert weight, M kept assignments, D model width, H expert hidden width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import _compat
from lightning_moe.compress.report import (
    WEIGHTS,
    CompressedExperts,
    CompressionReport,
    LayerCompression,
    check_bank,
    check_supported,
    expert_banks,
    module_bytes,
    weight_numel,
)
from lightning_moe.nn.experts import GroupedExperts, activation_function

KERNELS = ("dequant", "int8_mm")


def quantize_per_channel(w_EIO: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization of stacked ``x @ w`` weights.

    Args:
        w_EIO: ``[E, I, O]`` weights used as ``x_I @ w[e]``; every output column gets its own scale.
        bits: 8 (int8 storage).

    Returns:
        ``(q_EOI, scale_EO)``: int8 weights in ``nn.Linear`` layout (output rows) and float32
        scales with ``w[e, :, o] ~= q[e, o, :] * scale[e, o]``.
    """
    qmax = 2 ** (bits - 1) - 1
    w_EOI = w_EIO.detach().float().transpose(1, 2)
    scale_EO = w_EOI.abs().amax(dim=-1) / qmax
    scale_EO = torch.where(scale_EO > 0, scale_EO, torch.ones_like(scale_EO))  # an all-zero channel stays 0
    q_EOI = torch.round(w_EOI / scale_EO[..., None]).clamp_(-qmax, qmax).to(torch.int8).contiguous()
    return q_EOI, scale_EO


class QuantizedGroupedExperts(CompressedExperts):
    """Inference-only expert bank with int8 weights and per-output-channel float32 scales.

    Drop-in for :class:`~lightning_moe.nn.GroupedExperts` in ``layer.experts``: same forward
    ``(x_MD, counts) -> y_MD``, ``num_experts`` and ``expert_offset``. Weights are buffers (no
    gradients) ``w1_q [E, H, D]``, ``w2_q [E, D, H]``, ``w3_q [E, H, D]`` int8 with scales
    ``w*_scale [E, out]``; biases stay in their float dtype. Build one with :meth:`from_float`.

    Kernels: ``"dequant"`` (default) converts an expert's int8 weight to the input dtype on the fly
    and scales the output columns; ``"int8_mm"`` calls ``torch._weight_int8pack_mm`` (int8 weights
    read directly; float32/bfloat16 inputs). On our 2-core CPU the dequant path measured faster.

    Example:
        >>> dense = GroupedExperts(4, dim=8, hidden_dim=16)
        >>> q = QuantizedGroupedExperts.from_float(dense)
        >>> q(torch.randn(6, 8), [1, 2, 0, 3]).shape
        torch.Size([6, 8])
    """

    # Optional buffers, registered in __init__ (annotated for type checkers).
    w3_q: Tensor | None
    b1: Tensor | None
    b2: Tensor | None

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu",
        bias: bool = False,
        kernel: str = "dequant",
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"{type(self).__name__}: kernel={kernel!r} must be one of {KERNELS}")
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.kernel = kernel
        self.expert_offset = 0
        shapes = {"w1": (hidden_dim, dim), "w2": (dim, hidden_dim), "w3": (hidden_dim, dim)}
        for name in WEIGHTS:
            if name == "w3" and activation != "swiglu":
                self.register_buffer("w3_q", None)
                self.register_buffer("w3_scale", None)
                continue
            out_features, in_features = shapes[name]
            self.register_buffer(f"{name}_q", torch.zeros(num_experts, out_features, in_features, dtype=torch.int8,
                                                          device=device))
            self.register_buffer(f"{name}_scale", torch.ones(num_experts, out_features, device=device))
        factory: dict[str, Any] = {"dtype": bias_dtype, "device": device}
        self.register_buffer("b1", torch.zeros(num_experts, hidden_dim, **factory) if bias else None)
        self.register_buffer("b2", torch.zeros(num_experts, dim, **factory) if bias else None)

    @classmethod
    def from_float(cls, experts: GroupedExperts, bits: int = 8, kernel: str = "dequant") -> QuantizedGroupedExperts:
        """Quantize a :class:`GroupedExperts` bank (its ``expert_offset`` carries over).

        Args:
            experts: the float bank.
            bits: quantization bits; only 8 is implemented.
            kernel: ``"dequant"`` or ``"int8_mm"``.

        Raises:
            ValueError: for ``bits != 8``.
        """
        if bits != 8:
            raise ValueError(f"{cls.__name__}: bits={bits} must be 8; only int8 weight-only quantization is "
                             "implemented")
        check_supported(cls.__name__, experts)
        bias = experts.b1 is not None
        out = cls(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation, bias=bias, kernel=kernel,
                  bias_dtype=experts.w1.dtype, device=experts.w1.device)
        out.expert_offset = experts.expert_offset
        for name in WEIGHTS:
            w_EIO = getattr(experts, name)
            if w_EIO is None:
                continue
            q_EOI, scale_EO = quantize_per_channel(w_EIO, bits)
            getattr(out, f"{name}_q").copy_(q_EOI)
            getattr(out, f"{name}_scale").copy_(scale_EO)
        if out.b1 is not None and experts.b1 is not None:
            out.b1.copy_(experts.b1.detach())
        if out.b2 is not None and experts.b2 is not None:
            out.b2.copy_(experts.b2.detach())
        return out

    def dequantize(self, name: str) -> Tensor:
        """The float32 ``[E, I, O]`` weight that ``name`` (``"w1"``, ``"w2"``, ``"w3"``) stands for."""
        q_EOI, scale_EO = getattr(self, f"{name}_q"), getattr(self, f"{name}_scale")
        return (q_EOI.float() * scale_EO[..., None]).transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation!r}, kernel={self.kernel!r}")

    def _linear(self, x_CI: Tensor, name: str, e: int) -> Tensor:
        q_OI, scale_O = getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e]
        if self.kernel == "int8_mm":
            if _compat.weight_int8pack_mm is None:
                raise RuntimeError(f"{type(self).__name__}: this torch build has no torch._weight_int8pack_mm; "
                                   "use kernel='dequant'")
            return _compat.weight_int8pack_mm(x_CI, q_OI, scale_O.to(x_CI.dtype))
        # Per-output-channel scales commute with the GEMM: scale the [C, O] output, not the weight.
        return F.linear(x_CI, q_OI.to(x_CI.dtype)) * scale_O.to(x_CI.dtype)

    def _expert(self, e: int, x_CD: Tensor) -> Tensor:
        h_CH = self._linear(x_CD, "w1", e)
        if self.b1 is not None:
            h_CH = h_CH + self.b1[e].to(h_CH.dtype)
        if self.w3_q is not None:
            h_CH = F.silu(h_CH) * self._linear(x_CD, "w3", e)
        else:
            h_CH = activation_function(self.activation)(h_CH)
        y_CD = self._linear(h_CH, "w2", e)
        if self.b2 is not None:
            y_CD = y_CD + self.b2[e].to(y_CD.dtype)
        return y_CD

    def forward(self, x_MD: Tensor, counts: Sequence[int]) -> Tensor:
        """Run each expert on its slice of ``x_MD``; ``counts[e]`` rows belong to local expert e."""
        if len(counts) != self.num_experts:
            raise ValueError(f"{type(self).__name__}: got {len(counts)} counts for {self.num_experts} experts")
        outputs = [self._expert(e, x_CD) for e, x_CD in enumerate(torch.split(x_MD, list(counts))) if x_CD.shape[0]]
        return torch.cat(outputs) if outputs else x_MD.new_zeros((0, self.dim))


def quantize_experts(
    model: nn.Module, bits: int = 8, include_shared: bool = True, kernel: str = "dequant"
) -> CompressionReport:
    """Weight-only int8 quantization of every expert bank in ``model``, in place (for inference).

    Each :class:`GroupedExperts` in an :class:`~lightning_moe.MoE` layer becomes a
    :class:`QuantizedGroupedExperts` (symmetric, one scale per output channel of each expert
    weight): about 4x fewer bytes than float32 experts, 2x fewer than bfloat16. Other expert banks
    (template experts) are left as they are, with a warning. Routers and dense layers are untouched.
    To load a state dict saved after quantization, quantize the fresh model first.

    Args:
        model: a module holding MoE layers (or an MoE layer).
        bits: 8.
        include_shared: quantize shared experts too.
        kernel: ``"dequant"`` (dequantize on the fly) or ``"int8_mm"`` (``torch._weight_int8pack_mm``).

    Returns:
        A :class:`CompressionReport` with the bytes of every bank before and after.

    Raises:
        ValueError: for ``bits != 8`` or an unknown ``kernel``.

    Example:
        >>> from lightning_moe import MoE
        >>> model = nn.Sequential(MoE(dim=64, num_experts=4))
        >>> report = quantize_experts(model)
        >>> round(report.ratio, 1)
        3.8
    """
    if bits != 8:
        raise ValueError(f"quantize_experts: bits={bits} must be 8; only int8 weight-only quantization is implemented")
    if kernel not in KERNELS:
        raise ValueError(f"quantize_experts: kernel={kernel!r} must be one of {KERNELS}")
    report = CompressionReport(f"int{bits} weight-only")
    for path, layer, attr in list(expert_banks(model, include_shared)):
        bank = getattr(layer, attr)
        if not check_bank(bank, path, "quantize_experts"):
            continue
        quantized = QuantizedGroupedExperts.from_float(bank, bits, kernel)
        report.layers.append(LayerCompression(path, weight_numel(bank), weight_numel(quantized),
                                              module_bytes(bank), module_bytes(quantized), {"bits": bits}))
        setattr(layer, attr, quantized)
    return report


# ---------------------------------------------------------------------------------------------
# Low-rank factorization
# ---------------------------------------------------------------------------------------------


