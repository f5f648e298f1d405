"""Compress trained experts for inference: int8 weight-only quantization and low-rank (SVD) factors.

Experts hold almost all of an MoE model's parameters, so both methods touch expert banks only
(routers and dense layers stay as they are). Each swaps ``layer.experts`` (a
:class:`~lightning_moe.nn.GroupedExperts`) for a bank with the same interface
``(x_MD, counts) -> y_MD`` and the same ``num_experts`` / ``expert_offset``, so the layer, its
dispatcher and an expert-parallel shard run unchanged, and returns a :class:`CompressionReport`
of parameters and bytes before and after.

Shape legend: E experts held here, D model width, H expert hidden width, R rank, M kept assignments,
I / O input / output width of one expert weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import _compat
from lightning_moe.nn.experts import GroupedExperts, activation_function
from lightning_moe.nn.moe import find_moe_layers

WEIGHTS = ("w1", "w2", "w3")
SUPPORTED_ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def _check_supported(owner: str, experts: GroupedExperts) -> None:
    """Refuse banks whose computation the compressed banks do not reproduce (rather than change it silently)."""
    if experts.activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{owner}: experts with activation={experts.activation!r} are not supported (only "
                         f"{SUPPORTED_ACTIVATIONS}); leave those layers uncompressed")
KERNELS = ("dequant", "int8_mm")


@dataclass
class LayerCompression:
    """Saving of one expert bank.

    Attributes:
        name: module path of the bank (``"blocks.0.moe.experts"``).
        params_before: elements of the bank's weights before (int8 elements count as params too).
        params_after: elements after.
        bytes_before: bytes of the bank's parameters and buffers before.
        bytes_after: bytes after.
        detail: method specifics, e.g. ``{"w1": 12}`` ranks, or ``{"w1": "dense"}`` where a
            factorization would not save anything.
    """

    name: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    detail: dict = field(default_factory=dict)


@dataclass
class CompressionReport:
    """What a compression did, bank by bank; totals as properties."""

    method: str
    layers: list[LayerCompression] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after``: how many times smaller the expert banks became."""
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        lines = [f"{self.method}: expert bytes {self.bytes_before:,} -> {self.bytes_after:,} ({self.ratio:.2f}x), "
                 f"params {self.params_before:,} -> {self.params_after:,}"]
        lines += [f"  {layer.name}: {layer.bytes_before:,} -> {layer.bytes_after:,} B {layer.detail or ''}".rstrip()
                  for layer in self.layers]
        return "\n".join(lines)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _weight_numel(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() for t in tensors.values() if t.dtype != torch.long)


def _expert_banks(model: nn.Module, include_shared: bool):
    """Yield ``(path, owner MoE, attribute)`` of every expert bank in ``model``."""
    for name, layer in find_moe_layers(model):
        prefix = f"{name}." if name else ""
        yield f"{prefix}experts", layer, "experts"
        if include_shared and layer.shared_experts is not None:
            yield f"{prefix}shared_experts", layer, "shared_experts"


def _check_bank(bank: nn.Module, path: str, method: str) -> bool:
    if isinstance(bank, GroupedExperts):
        return True
    if isinstance(bank, (QuantizedGroupedExperts, LowRankGroupedExperts)):
        return False  # already compressed: applying twice is a no-op
    warnings.warn(f"{method}: {path} is a {type(bank).__name__}, not GroupedExperts; left uncompressed", stacklevel=3)
    return False


# ---------------------------------------------------------------------------------------------
# int8 weight-only quantization
# ---------------------------------------------------------------------------------------------


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


class QuantizedGroupedExperts(nn.Module):
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
        factory = {"dtype": bias_dtype, "device": device}
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
        _check_supported(cls.__name__, experts)
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
        if bias:
            out.b1.copy_(experts.b1.detach())
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
    for path, layer, attr in list(_expert_banks(model, include_shared)):
        bank = getattr(layer, attr)
        if not _check_bank(bank, path, "quantize_experts"):
            continue
        quantized = QuantizedGroupedExperts.from_float(bank, bits, kernel)
        report.layers.append(LayerCompression(path, _weight_numel(bank), _weight_numel(quantized),
                                              module_bytes(bank), module_bytes(quantized), {"bits": bits}))
        setattr(layer, attr, quantized)
    return report


# ---------------------------------------------------------------------------------------------
# Low-rank factorization
# ---------------------------------------------------------------------------------------------


def low_rank_factors(w_EIO: Tensor, rank: int | None = None, energy: float = 0.9) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of every expert's weight, one rank for the whole bank.

    With ``rank=None`` each expert needs the smallest rank whose squared singular values keep
    ``energy`` of the total; the bank takes the largest of those, so every expert keeps at least
    ``energy`` (relative Frobenius error at most ``sqrt(1 - energy)``).

    Args:
        w_EIO: ``[E, I, O]`` weights.
        rank: a fixed rank (capped at ``min(I, O)``), or None to choose by ``energy``.
        energy: fraction of squared singular values to keep, in (0, 1].

    Returns:
        ``(a_EIR, b_ERO, kept_energy_E)`` in float32 with ``w[e] ~= a[e] @ b[e]``.
    """
    u_EIK, s_EK, vh_EKO = torch.linalg.svd(w_EIO.detach().float(), full_matrices=False)
    if rank is None:
        rank = _energy_rank(s_EK, energy)
    rank = max(1, min(rank, s_EK.shape[-1]))
    root_ER = s_EK[:, :rank].sqrt()  # split S evenly between the factors: better conditioned to fine-tune
    a_EIR = u_EIK[:, :, :rank] * root_ER[:, None, :]
    b_ERO = root_ER[:, :, None] * vh_EKO[:, :rank, :]
    kept_E = (s_EK[:, :rank] ** 2).sum(-1) / (s_EK**2).sum(-1).clamp_min(1e-30)
    return a_EIR, b_ERO, kept_E


def _energy_rank(s_EK: Tensor, energy: float) -> int:
    share_EK = (s_EK**2).cumsum(-1) / (s_EK**2).sum(-1, keepdim=True).clamp_min(1e-30)
    # Rank r keeps share[r - 1]; the tolerance stops float round-off from asking for one more.
    return int((share_EK < energy - 1e-6).sum(-1).max()) + 1


def energy_rank(w_EIO: Tensor, energy: float = 0.9) -> int:
    """The rank :func:`low_rank_factors` picks with ``rank=None``: the smallest keeping ``energy`` of every expert."""
    return _energy_rank(torch.linalg.svdvals(w_EIO.detach().float()), energy)


def energy_ranks(model: nn.Module, energy: float = 0.9, include_shared: bool = True) -> dict[str, dict[str, int]]:
    """The rank :func:`low_rank_experts` would pick for each weight of each uncompressed bank: ``{path: {w: rank}}``.

    Each process of an expert-parallel job holds other experts, so picks its own ranks: take the
    largest over the processes (every expert then keeps at least ``energy``) and pass the result as
    ``low_rank_experts(..., ranks=...)``, so that every process factors to the same shapes
    (:class:`~lightning_moe.callbacks.LowRankExperts` does).
    """
    out = {}
    for path, layer, attr in _expert_banks(model, include_shared):
        bank = getattr(layer, attr)
        if isinstance(bank, GroupedExperts):
            out[path] = {name: energy_rank(w, energy) for name in WEIGHTS if (w := getattr(bank, name)) is not None}
    return out


class LowRankGroupedExperts(nn.Module):
    """Expert bank whose weights are products of two thin factors, ``w[e] = a[e] @ b[e]``.

    Drop-in for :class:`~lightning_moe.nn.GroupedExperts` in ``layer.experts`` (same forward,
    ``num_experts``, ``expert_offset``). Each of ``w1``/``w2``/``w3`` is either factored, as
    parameters ``{name}_a [E, I, R]`` and ``{name}_b [E, R, O]``, or kept dense as ``{name}``
    where a factorization would not be smaller. All are trainable parameters, so the compressed
    model can be fine-tuned. Build one with :meth:`from_dense`.

    Example:
        >>> dense = GroupedExperts(4, dim=8, hidden_dim=32)
        >>> low = LowRankGroupedExperts.from_dense(dense, rank=2)
        >>> low(torch.randn(6, 8), [1, 2, 0, 3]).shape, low.ranks
        (torch.Size([6, 8]), {'w1': 2, 'w2': 2})
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.expert_offset = 0
        self.ranks: dict[str, int | str] = {}
        self.kept_energy: dict[str, float] = {}
        self.b1: nn.Parameter | None = None
        self.b2: nn.Parameter | None = None

    @classmethod
    def from_dense(
        cls, experts: GroupedExperts, rank: int | None = None, energy: float = 0.9,
        ranks: Mapping[str, int] | None = None,
    ) -> LowRankGroupedExperts:
        """Factor a :class:`GroupedExperts` bank weight by weight (see :func:`low_rank_factors`).

        A weight stays dense when ``rank * (I + O) >= I * O`` (factoring would not save).
        ``ranks`` (``{"w1": r, ...}``) fixes the rank of the weights it names, over ``rank`` / ``energy``.
        """
        _check_supported(cls.__name__, experts)
        out = cls(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation)
        out.expert_offset = experts.expert_offset
        for name in WEIGHTS:
            w_EIO = getattr(experts, name)
            if w_EIO is None:
                continue
            a_EIR, b_ERO, kept_E = low_rank_factors(w_EIO, (ranks or {}).get(name, rank), energy)
            num_in, num_out, r = w_EIO.shape[1], w_EIO.shape[2], a_EIR.shape[-1]
            if r * (num_in + num_out) >= num_in * num_out:
                out.register_parameter(name, nn.Parameter(w_EIO.detach().clone()))
                out.ranks[name], out.kept_energy[name] = "dense", 1.0
                continue
            dtype = w_EIO.dtype
            out.register_parameter(f"{name}_a", nn.Parameter(a_EIR.to(dtype).contiguous()))
            out.register_parameter(f"{name}_b", nn.Parameter(b_ERO.to(dtype).contiguous()))
            out.ranks[name], out.kept_energy[name] = r, float(kept_E.min())
        if experts.b1 is not None:
            out.b1 = nn.Parameter(experts.b1.detach().clone())
            out.b2 = nn.Parameter(experts.b2.detach().clone())
        return out

    def weight(self, name: str) -> Tensor | None:
        """The ``[E, I, O]`` weight ``name`` stands for (the product of its factors)."""
        if name in self._parameters:
            return self._parameters[name]
        if f"{name}_a" not in self._parameters:
            return None
        return self._parameters[f"{name}_a"] @ self._parameters[f"{name}_b"]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, ranks={self.ranks}"

    def _per_expert(self, name: str) -> list[tuple[Tensor, ...]] | None:
        # NOTE: unbind once per forward, not w[e] per expert: E separate selects would each
        # materialise a full-size zero gradient of the stacked parameter in backward.
        if name in self._parameters:
            return [(w,) for w in self._parameters[name].unbind(0)]
        if f"{name}_a" not in self._parameters:
            return None
        a_EIR, b_ERO = self._parameters[f"{name}_a"], self._parameters[f"{name}_b"]
        return list(zip(a_EIR.unbind(0), b_ERO.unbind(0), strict=True))

    @staticmethod
    def _matmul(x_CI: Tensor, factors: tuple[Tensor, ...]) -> Tensor:
        for w in factors:  # (x @ a) @ b: two thin GEMMs, never the full [I, O] weight
            x_CI = x_CI @ w
        return x_CI

    def forward(self, x_MD: Tensor, counts: Sequence[int]) -> Tensor:
        """Run each expert on its slice of ``x_MD``; ``counts[e]`` rows belong to local expert e."""
        if len(counts) != self.num_experts:
            raise ValueError(f"{type(self).__name__}: got {len(counts)} counts for {self.num_experts} experts")
        w1, w2, w3 = (self._per_expert(name) for name in WEIGHTS)
        b1 = self.b1.unbind(0) if self.b1 is not None else None
        b2 = self.b2.unbind(0) if self.b2 is not None else None
        outputs = []
        for e, x_CD in enumerate(torch.split(x_MD, list(counts))):
            if x_CD.shape[0] == 0:
                continue
            h_CH = self._matmul(x_CD, w1[e])
            if b1 is not None:
                h_CH = h_CH + b1[e]
            if w3 is not None:
                h_CH = F.silu(h_CH) * self._matmul(x_CD, w3[e])
            else:
                h_CH = activation_function(self.activation)(h_CH)
            y_CD = self._matmul(h_CH, w2[e])
            outputs.append(y_CD if b2 is None else y_CD + b2[e])
        if not outputs:  # keep every factor in the graph, as GroupedExperts does for an empty step
            anchor = sum((p.sum() * 0 for p in self.parameters()), x_MD.new_zeros(()))
            return x_MD.new_zeros((0, self.dim)) + anchor.to(x_MD.dtype)
        return torch.cat(outputs)


def low_rank_experts(
    model: nn.Module, rank: int | None = None, energy: float = 0.9, include_shared: bool = True,
    ranks: Mapping[str, Mapping[str, int]] | None = None,
) -> CompressionReport:
    """Replace every expert bank's weights by truncated-SVD factors, in place.

    Each :class:`GroupedExperts` becomes a :class:`LowRankGroupedExperts`. The rank of each weight
    (``w1``, ``w2``, ``w3``) is ``rank`` or, with ``rank=None``, the smallest that keeps ``energy``
    of every expert's squared singular values; a weight whose factors would not be smaller stays
    dense. Trained experts compress far better than freshly initialised (random) ones.

    Args:
        model: a module holding MoE layers (or an MoE layer).
        rank: fixed rank for every weight, or None to pick it by ``energy``.
        energy: fraction of squared singular values to keep per expert weight, in (0, 1].
        include_shared: factor shared experts too.
        ranks: ``{bank path: {"w1": r, ...}}``, fixed ranks that override ``rank`` / ``energy`` for the
            weights they name (from :func:`energy_ranks`, agreed over the processes of a job).

    Returns:
        A :class:`CompressionReport`; ``detail`` holds the rank of each weight (``"dense"`` when kept).

    Raises:
        ValueError: for ``rank < 1`` or ``energy`` outside (0, 1].

    Example:
        >>> from lightning_moe import MoE
        >>> model = nn.Sequential(MoE(dim=16, num_experts=4, hidden_dim=64))
        >>> low_rank_experts(model, rank=4).layers[0].detail
        {'w1': 4, 'w2': 4}
    """
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"low_rank_experts: rank={rank!r} must be a positive int, or None to choose by energy")
    if not 0 < energy <= 1:
        raise ValueError(f"low_rank_experts: energy={energy!r} must be in (0, 1], e.g. 0.9")
    report = CompressionReport(f"low rank ({'rank=' + str(rank) if rank else f'energy={energy}'})")
    for path, layer, attr in list(_expert_banks(model, include_shared)):
        bank = getattr(layer, attr)
        if not _check_bank(bank, path, "low_rank_experts"):
            continue
        low = LowRankGroupedExperts.from_dense(bank, rank, energy, (ranks or {}).get(path))
        report.layers.append(LayerCompression(path, _weight_numel(bank), _weight_numel(low),
                                              module_bytes(bank), module_bytes(low), dict(low.ranks)))
        setattr(layer, attr, low)
    return report
