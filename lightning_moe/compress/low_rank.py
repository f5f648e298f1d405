"""Low-rank (SVD) factors of expert banks, by rank or by kept energy.

Shape legend (the package's, see :mod:`lightning_moe.nn`): E experts held here, I / O input / output width of
one expert weight, U rank of the factors (a_EIU @ b_EUO), M kept assignments, D model width, H expert hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        ``(a_EIU, b_EUO, kept_energy_E)`` in float32 with ``w[e] ~= a[e] @ b[e]``.
    """
    u_EIK, s_EK, vh_EKO = torch.linalg.svd(w_EIO.detach().float(), full_matrices=False)
    if rank is None:
        rank = _energy_rank(s_EK, energy)
    rank = max(1, min(rank, s_EK.shape[-1]))
    root_EU = s_EK[:, :rank].sqrt()  # split S evenly between the factors: better conditioned to fine-tune
    a_EIU = u_EIK[:, :, :rank] * root_EU[:, None, :]
    b_EUO = root_EU[:, :, None] * vh_EKO[:, :rank, :]
    kept_E = (s_EK[:, :rank] ** 2).sum(-1) / (s_EK**2).sum(-1).clamp_min(1e-30)
    return a_EIU, b_EUO, kept_E


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
    for path, layer, attr in expert_banks(model, include_shared):
        bank = getattr(layer, attr)
        if isinstance(bank, GroupedExperts):
            out[path] = {name: energy_rank(w, energy) for name in WEIGHTS if (w := getattr(bank, name)) is not None}
    return out


class LowRankGroupedExperts(CompressedExperts):
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
        check_supported(cls.__name__, experts)
        out = cls(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation)
        out.expert_offset = experts.expert_offset
        for name in WEIGHTS:
            w_EIO = getattr(experts, name)
            if w_EIO is None:
                continue
            a_EIU, b_EUO, kept_E = low_rank_factors(w_EIO, (ranks or {}).get(name, rank), energy)
            num_in, num_out, r = w_EIO.shape[1], w_EIO.shape[2], a_EIU.shape[-1]
            if r * (num_in + num_out) >= num_in * num_out:
                out.register_parameter(name, nn.Parameter(w_EIO.detach().clone()))
                out.ranks[name], out.kept_energy[name] = "dense", 1.0
                continue
            dtype = w_EIO.dtype
            out.register_parameter(f"{name}_a", nn.Parameter(a_EIU.to(dtype).contiguous()))
            out.register_parameter(f"{name}_b", nn.Parameter(b_EUO.to(dtype).contiguous()))
            out.ranks[name], out.kept_energy[name] = r, float(kept_E.min())
        if experts.b1 is not None:
            out.b1 = nn.Parameter(experts.b1.detach().clone())
        if experts.b2 is not None:
            out.b2 = nn.Parameter(experts.b2.detach().clone())
        return out

    def weight(self, name: str) -> Tensor | None:
        """The ``[E, I, O]`` weight ``name`` stands for (the product of its factors)."""
        if name in self._parameters:
            return self._parameters[name]
        if f"{name}_a" not in self._parameters:
            return None
        return self.get_parameter(f"{name}_a") @ self.get_parameter(f"{name}_b")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, ranks={self.ranks}"

    def _per_expert(self, name: str) -> list[tuple[Tensor, ...]] | None:
        # NOTE: unbind once per forward, not w[e] per expert: E separate selects would each
        # materialise a full-size zero gradient of the stacked parameter in backward.
        if name in self._parameters:
            return [(w,) for w in self.get_parameter(name).unbind(0)]
        if f"{name}_a" not in self._parameters:
            return None
        a_EIU, b_EUO = self.get_parameter(f"{name}_a"), self.get_parameter(f"{name}_b")
        return list(zip(a_EIU.unbind(0), b_EUO.unbind(0), strict=True))

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
        if w1 is None or w2 is None:
            raise RuntimeError(f"{type(self).__name__}: holds no w1/w2; build it with from_dense")
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
    for path, layer, attr in list(expert_banks(model, include_shared)):
        bank = getattr(layer, attr)
        if not check_bank(bank, path, "low_rank_experts"):
            continue
        low = LowRankGroupedExperts.from_dense(bank, rank, energy, (ranks or {}).get(path))
        report.layers.append(LayerCompression(path, weight_numel(bank), weight_numel(low),
                                              module_bytes(bank), module_bytes(low), dict(low.ranks)))
        setattr(layer, attr, low)
    return report

