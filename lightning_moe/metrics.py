"""torchmetrics ``Metric``s of routing quality: expert load, load imbalance, dropped tokens, entropy.

Each metric keeps additive states (``dist_reduce_fx="sum"``), so the value synced over processes is
the value of the union of their data; ratios are formed only in ``compute()``. ``update`` takes
either an :class:`~lightning_moe.MoE` layer (its statistics of the last forward, read from the
layer's buffers, no host sync) or raw routing tensors:

=====================  ======================================================================
metric                 raw ``update`` input
=====================  ======================================================================
``ExpertLoad``         ``top_ids``: int ``[T, K]`` expert ids; ``num_experts`` marks padding
``LoadImbalance``      as ``ExpertLoad``
``DroppedTokenRate``   as ``ExpertLoad``; capacity from the metric's ``capacity_factor``
``RoutingEntropy``     ``scores``: float ``[T, E]`` router probabilities (rows renormalised)
=====================  ======================================================================

One metric instance tracks one layer (or one stream of routing decisions); use one per layer.

Shape legend: T tokens, K top_k, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.nn import functional as MF
from lightning_moe.nn.moe import MoE


def _check_num_experts(metric: Metric, num_experts: int | None, required: bool) -> None:
    if num_experts is None and not required:
        return
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts <= 0:
        raise ValueError(f"{type(metric).__name__}: num_experts={num_experts!r} must be a positive int "
                         "(the number of routed experts of the layer you track)")


def _check_layer(metric: Metric, layer: MoE, num_experts: int | None) -> None:
    if num_experts is not None and layer.num_experts != num_experts:
        raise ValueError(f"{type(metric).__name__}: layer {layer.layer_name or ''} has num_experts="
                         f"{layer.num_experts} but the metric was built with num_experts={num_experts}; "
                         "use one metric per layer, built with that layer's num_experts")


def _check_ids(metric: Metric, top_ids_TK: Tensor) -> None:
    if not isinstance(top_ids_TK, Tensor) or top_ids_TK.ndim != 2 or torch.is_floating_point(top_ids_TK):
        got = f"{tuple(top_ids_TK.shape)} {top_ids_TK.dtype}" if isinstance(top_ids_TK, Tensor) else type(top_ids_TK)
        raise ValueError(f"{type(metric).__name__}: update() takes an MoE layer or integer top_ids of shape "
                         f"[tokens, top_k], got {got}; pass ids.view(-1, 1) for top-1 routing")


def _count_ids(top_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert ``[E]`` (int64); id ``E`` (padding) is ignored. No host sync."""
    ids_N = top_ids_TK.reshape(-1).long()
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids_N.device)
    counts.scatter_add_(0, ids_N, torch.ones_like(ids_N))
    return counts[:num_experts]


class ExpertLoad(Metric):
    """Token->expert assignments per expert, summed over updates (and processes).

    Args:
        num_experts: routed experts E of the tracked layer.
        normalize: return shares (summing to 1) instead of counts.
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``num_experts`` is not a positive int, or an update does not match it.

    Example:
        >>> import torch
        >>> from lightning_moe.metrics import ExpertLoad
        >>> metric = ExpertLoad(num_experts=4)
        >>> metric.update(torch.tensor([[0, 1], [0, 2], [4, 4]]))  # last token is padding (id 4)
        >>> metric.compute()
        tensor([2, 1, 1, 0])
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False
    tokens: Tensor  # metric state, registered by add_state (annotated for type checkers)

    def __init__(self, num_experts: int, normalize: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_num_experts(self, num_experts, required=True)
        self.num_experts = num_experts
        self.normalize = normalize
        self.add_state("tokens", default=torch.zeros(num_experts, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, routing: MoE | Tensor) -> None:
        """Add the counts of a layer's last forward, or of raw ``top_ids`` ``[T, K]``."""
        if isinstance(routing, MoE):
            _check_layer(self, routing, self.num_experts)
            self.tokens += routing.tokens_per_expert.to(self.tokens.device)
        else:
            _check_ids(self, routing)
            self.tokens += _count_ids(routing, self.num_experts).to(self.tokens.device)

    def compute(self) -> Tensor:
        if self.normalize:
            return self.tokens / self.tokens.sum().clamp_min(1)
        return self.tokens


class LoadImbalance(ExpertLoad):
    """Load of the busiest expert over the mean load, ``max_i n_i / mean_i n_i``.

    1.0 is perfect balance; ``num_experts`` means one expert took everything. Counts are summed over
    updates (and processes) first, so this is the imbalance of the union of the data. 1.0 when no
    token was routed.

    Args:
        num_experts: routed experts E of the tracked layer.
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_moe.metrics import LoadImbalance
        >>> metric = LoadImbalance(num_experts=4)
        >>> metric.update(torch.tensor([[0], [0], [1], [2], [3], [0]]))  # loads 3, 1, 1, 1
        >>> metric.compute()
        tensor(2.)
    """

    higher_is_better = False

    def __init__(self, num_experts: int, **kwargs) -> None:
        super().__init__(num_experts, normalize=False, **kwargs)

    def compute(self) -> Tensor:
        return load_imbalance(self.tokens.float())


def load_imbalance(loads_E: Tensor) -> Tensor:
    """``max / mean`` over the last dim of non-negative loads ``[..., E]``; 1.0 where all are zero."""
    total = loads_E.sum(dim=-1)
    ratio = loads_E.amax(dim=-1) * loads_E.shape[-1] / total.clamp_min(1e-12)
    return torch.where(total > 0, ratio, torch.ones_like(ratio))


class DroppedTokenRate(Metric):
    """Share of token->expert assignments dropped because their expert was full.

    From a layer: its ``dropped_tokens`` over the assignments of its last forward (expert choice:
    routed tokens that no expert took, over routed tokens). From raw ``top_ids``: the drops the
    layer's capacity rule gives, ``ceil(capacity_factor * tokens * top_k / num_experts)`` slots per
    expert; ``capacity_factor=None`` (dropless) counts assignments but never drops.

    Args:
        num_experts: routed experts E; needed for raw ``top_ids`` only.
        capacity_factor: capacity rule applied to raw ``top_ids``; None for dropless.
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: bad ``num_experts``/``capacity_factor``, or raw ids without ``num_experts``.

    Example:
        >>> import torch
        >>> from lightning_moe.metrics import DroppedTokenRate
        >>> metric = DroppedTokenRate(num_experts=2, capacity_factor=1.0)  # 2 slots per expert here
        >>> metric.update(torch.tensor([[0], [0], [0], [1]]))  # expert 0 gets 3, keeps 2
        >>> metric.compute()
        tensor(0.2500)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    # Metric states, registered by add_state (annotated for type checkers).
    dropped: Tensor
    assignments: Tensor

    def __init__(self, num_experts: int | None = None, capacity_factor: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_num_experts(self, num_experts, required=False)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"{type(self).__name__}: capacity_factor={capacity_factor!r} must be > 0, "
                             "or None for dropless routing")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.add_state("dropped", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("assignments", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, routing: MoE | Tensor) -> None:
        """Add a layer's last forward, or raw ``top_ids`` ``[T, K]`` (needs ``num_experts``)."""
        if isinstance(routing, MoE):
            _check_layer(self, routing, self.num_experts)
            self.dropped += routing.dropped_tokens.to(self.dropped.device)
            self.assignments += routing.assignments.to(self.assignments.device)
            return
        _check_ids(self, routing)
        if self.num_experts is None:
            raise ValueError(f"{type(self).__name__}: num_experts=None; build the metric with num_experts=E "
                             "to update it from raw top_ids")
        counts_E = _count_ids(routing, self.num_experts)
        if self.capacity_factor is not None:
            routed_tokens = (routing[:, 0] < self.num_experts).sum()
            capacity = MF.expert_capacity(self.capacity_factor, routed_tokens, routing.shape[1], self.num_experts)
            self.dropped += (counts_E - capacity.to(counts_E.device)).clamp_min(0).sum().to(self.dropped.device)
        self.assignments += counts_E.sum().to(self.assignments.device)

    def compute(self) -> Tensor:
        return self.dropped.float() / self.assignments.clamp_min(1).float()


class RoutingEntropy(Metric):
    """Mean per-token entropy (nats) of the router's distribution over experts.

    ``log(E)`` is an undecided router, 0 a router that is certain. Tokens are weighted equally
    across updates: a layer's value counts once per routed (non-padded) token.

    Args:
        kwargs: forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_moe.metrics import RoutingEntropy
        >>> metric = RoutingEntropy()
        >>> metric.update(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))  # log(2) and 0
        >>> metric.compute()
        tensor(0.3466)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    # Metric states, registered by add_state (annotated for type checkers).
    entropy_sum: Tensor
    tokens: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("entropy_sum", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, routing: MoE | Tensor) -> None:
        """Add a layer's last forward, or raw router probabilities ``scores`` ``[T, E]``."""
        if isinstance(routing, MoE):
            tokens, entropy = routing.routed_tokens, routing.router_entropy
        else:
            if not isinstance(routing, Tensor) or routing.ndim != 2 or not torch.is_floating_point(routing):
                got = f"{tuple(routing.shape)} {routing.dtype}" if isinstance(routing, Tensor) else type(routing)
                raise ValueError(f"{type(self).__name__}: update() takes an MoE layer or float router "
                                 f"probabilities of shape [tokens, experts], got {got}")
            tokens = torch.tensor(routing.shape[0])
            entropy = MF.routing_entropy(routing.float())
        device = self.tokens.device
        self.entropy_sum += entropy.to(device, self.entropy_sum.dtype) * tokens.to(device)
        self.tokens += tokens.to(device)

    def compute(self) -> Tensor:
        return self.entropy_sum / self.tokens.clamp_min(1)


__all__ = ["DroppedTokenRate", "ExpertLoad", "LoadImbalance", "RoutingEntropy", "load_imbalance"]
