"""Expert parallelism: shard each MoE layer's experts over an expert-parallel (EP) group.

Rank ``j`` of an EP group of size ``P`` holds experts ``[j * E/P, (j + 1) * E/P)`` of every layer,
keeping their global ids (``experts.expert_offset``). The layer is untouched otherwise: the
:class:`ExpertParallelDispatcher` installed as ``layer.expert_dispatcher`` moves each token to the rank
holding its expert and back. The sequence is written once, in :class:`ShardedDispatcher`:

1. ``plan``: all-to-all the per-expert counts, so every rank knows how many rows it will receive, and
   bring sent and received counts to the host together (the one host sync of an EP layer);
2. all-to-all the rows (uneven splits, autograd);
3. regroup the received rows from source-major to local-expert-major and run the local experts;
4. undo the regrouping and all-to-all the outputs back (the backward of 2 and 4 is the reverse).

Every rank takes part in every exchange, forward and backward, whatever it holds: a rank whose experts
receive no row still returns rows that depend on the (empty) received ones, so autograd runs that
exchange's backward there as on its peers, and returned rows have the dtype every rank derives from
the same information (:func:`~lightning_moe.nn.dispatch.expert_output_dtype`), not from whether its
experts ran.

Shape legend (the package's, see :mod:`lightning_moe.nn`): M rows this rank sends (its kept
assignments), R rows it receives, D model width, E global experts, P EP group size (also
the index of the source rank of received rows), L = E/P local experts.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe.distributed.all_to_all import all_to_all, all_to_all_counts
from lightning_moe.distributed.gather import gather_experts
from lightning_moe.distributed.overlap import overlapped_experts
from lightning_moe.nn.dispatch import DispatchPlan, expert_output_dtype
from lightning_moe.nn.experts import GroupedExperts, TemplateExperts
from lightning_moe.nn.moe import MoE, find_moe_layers

GROUPED_PARAMS = ("w1", "w2", "w3", "b1", "b2", "b3")
# Per-forward routing stats of the layer: rank-local values, never broadcast by DDP.
STAT_BUFFERS = ("tokens_per_expert", "dropped_tokens", "routed_tokens", "router_entropy", "global_tokens_per_expert")


@dataclass(frozen=True)
class ExpertShard:
    """The experts of one MoE layer that this rank holds.

    Attributes:
        path: module path of the MoE layer inside the sharded root module (``""`` for the root).
        num_experts: global number of experts E.
        ep_size: expert-parallel group size P.
        ep_rank: this rank's index in its EP group.
        template: True for :class:`TemplateExperts` (one module per expert), False for stacked weights.
    """

    path: str
    num_experts: int
    ep_size: int
    ep_rank: int
    template: bool

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def offset(self) -> int:
        """Global id of local expert 0."""
        return self.ep_rank * self.num_local

    @property
    def prefix(self) -> str:
        """State-dict prefix of the layer's expert bank (``"<path>.experts."``)."""
        return f"{self.path}.experts." if self.path else "experts."


class ShardedDispatcher(abc.ABC):
    """The expert-parallel dispatch sequence (an :class:`~lightning_moe.nn.dispatch.ExpertDispatcher`).

    Subclasses differ only in the exchange primitives: :meth:`exchange_counts` and
    :meth:`exchange_rows` (a real all-to-all in :class:`ExpertParallelDispatcher`, a mirrored local copy
    in :class:`~lightning_moe.distributed.simulated.SimulatedExpertParallel`).

    Args:
        shard: the experts this rank holds (the layer's ``experts`` hold exactly these).
    """

    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard

    @abc.abstractmethod
    def exchange_counts(self, send_counts_E: Tensor) -> Tensor:
        """Chunk ``r`` of ``send_counts_E`` (``L`` counts) goes to rank ``r``; returns ``[P * L]``, chunk ``s``
        from source ``s`` (device tensor, no autograd)."""

    @abc.abstractmethod
    def exchange_rows(self, x_MD: Tensor, output_splits: Sequence[int], input_splits: Sequence[int]) -> Tensor:
        """Differentiable all-to-all of rows: ``input_splits[r]`` rows go to rank ``r``, ``output_splits[s]``
        arrive from rank ``s``, in source order."""

    def __repr__(self) -> str:
        s = self.shard
        return (f"{type(self).__name__}(experts {s.offset}..{s.offset + s.num_local - 1} of {s.num_experts}, "
                f"ep_rank={s.ep_rank} of {s.ep_size})")

    def plan(self, kept_counts_E: Tensor, host_counts: Sequence[int] | None = None) -> DispatchPlan:
        """Step 1: exchange the per-expert counts and bring what the exchange needs to the host.

        Raises:
            ValueError: if ``kept_counts_E`` does not have one count per expert of the shard's layer.
        """
        P, L = self.shard.ep_size, self.shard.num_local
        if kept_counts_E.numel() != P * L:
            raise ValueError(f"{type(self).__name__}: got counts for {kept_counts_E.numel()} experts, the shard "
                             f"has {P * L}; install it on the layer it was built for")
        send_E = kept_counts_E.long()
        recv_counts_PL = self.exchange_counts(send_E).view(P, L)
        # NOTE: the one host sync of an EP layer: split sizes and expert GEMMs need the counts, so
        # sent and received counts come to the host together (received only, when sent are known).
        if host_counts is None:
            counts = torch.cat([send_E, recv_counts_PL.reshape(-1)]).tolist()
            send, recv = counts[: P * L], counts[P * L:]
        else:
            send, recv = list(host_counts), recv_counts_PL.reshape(-1).tolist()
        return DispatchPlan.from_counts(send, recv, recv_counts_PL)

    def __call__(self, x_MD: Tensor, plan: DispatchPlan, experts: nn.Module) -> Tensor:
        """Steps 2-4: rows out, local experts, rows back; ``y_MD`` in ``x_MD``'s order."""
        dtype = expert_output_dtype(x_MD)  # the same on every rank, whatever each holds
        # 2. rows to the ranks holding their experts; received rows are source-major.
        x_RD = self.exchange_rows(x_MD, plan.output_splits, plan.input_splits)
        # 3. regroup by local expert and run the local experts.
        order_R = expert_major_order(plan.received_counts_PL, plan.num_received)
        x_RD = x_RD.index_select(0, order_R)
        y_RD = experts(x_RD, plan.local_counts).to(dtype)
        if plan.num_received == 0:
            # No row reached this rank's experts: tie the (empty) output to the received rows anyway,
            # so this rank's backward runs step 2's reverse exchange, which its peers run too.
            y_RD = y_RD + x_RD.to(dtype)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        # 4. outputs back to the ranks that own the tokens, in the order they were sent.
        return self.exchange_rows(y_RD.index_select(0, inverse_R), plan.input_splits, plan.output_splits)


class ExpertParallelDispatcher(ShardedDispatcher):
    """``layer.expert_dispatcher`` that runs a layer's experts across an EP process group.

    Args:
        shard: which experts this rank holds.
        group: the EP process group (ranks of one expert group, in EP-rank order).
        overlap: run stacked experts (:class:`~lightning_moe.nn.GroupedExperts`) through the overlapped
            exchange (:mod:`~lightning_moe.distributed.overlap`: a rank's own rows are computed while the
            others travel, forward and backward); False runs the sequence of :class:`ShardedDispatcher`.

    Example (inside an initialised process group of 2 ranks)::

        shard_moe_layer(layer, "", ep_rank=rank, ep_size=2, group=dist.group.WORLD)
        y = layer(x)   # layer.dispatcher.plan exchanges counts, layer.dispatcher(...) the rows
    """

    def __init__(self, shard: ExpertShard, group: dist.ProcessGroup | None, overlap: bool = True) -> None:
        super().__init__(shard)
        self.group = group
        self.overlap = overlap

    def __call__(self, x_MD: Tensor, plan: DispatchPlan, experts: nn.Module) -> Tensor:
        grouped = experts if self.overlap and isinstance(experts, GroupedExperts) else None
        params = grouped.fused_params(x_MD) if grouped is not None else None
        if grouped is None or params is None or torch.compiler.is_compiling():
            return super().__call__(x_MD, plan, experts)
        x_MD = x_MD.to(expert_output_dtype(x_MD))
        return overlapped_experts(x_MD, plan, self.shard.ep_rank, self.group, params, grouped.activation)

    def exchange_counts(self, send_counts_E: Tensor) -> Tensor:
        return all_to_all_counts(send_counts_E, self.group)

    def exchange_rows(self, x_MD: Tensor, output_splits: Sequence[int], input_splits: Sequence[int]) -> Tensor:
        return all_to_all(x_MD, output_splits, input_splits, self.group)

    def __repr__(self) -> str:
        s = self.shard
        return (f"{type(self).__name__}(experts {s.offset}..{s.offset + s.num_local - 1} of {s.num_experts}, "
                f"ep={s.ep_size})")


def expert_major_order(counts_PL: Tensor, total: int) -> Tensor:
    """Permutation that regroups source-major rows by local expert.

    Rows arrive as blocks ``(s, e)`` ordered by source ``s`` then local expert ``e``; the result
    ``order`` lists row indices so that ``x[order]`` holds blocks ordered by ``e`` then ``s``.

    Args:
        counts_PL: rows per (source rank, local expert).
        total: ``counts_PL.sum()`` known on the host (avoids a sync).

    Returns:
        LongTensor ``[total]`` on ``counts_PL``'s device.
    """
    flat_PL = counts_PL.reshape(-1)
    start_PL = (flat_PL.cumsum(0) - flat_PL).view_as(counts_PL)  # where block (s, e) starts in the input
    count_LP = counts_PL.t().reshape(-1)
    start_LP = start_PL.t().reshape(-1)
    out_start_LP = count_LP.cumsum(0) - count_LP  # where block (e, s) starts in the output
    shift = torch.repeat_interleave(start_LP - out_start_LP, count_LP, output_size=total)
    return shift + torch.arange(total, device=counts_PL.device)


def check_expert_parallel_size(layers: list[tuple[str, MoE]], ep_size: int, world_size: int, owner: str) -> None:
    """Raise before training when the sizes cannot shard.

    Raises:
        ValueError: if ``world_size % ep_size`` or some layer's ``num_experts % ep_size`` is not 0.
    """
    if world_size % ep_size:
        raise ValueError(f"{owner}: expert_parallel_size={ep_size} must divide the world size {world_size}; "
                         "pick a divisor of the number of processes")
    for path, layer in layers:
        if layer.num_experts % ep_size:
            raise ValueError(f"{owner}: layer {path or '<root>'!r} has num_experts={layer.num_experts}, not a multiple "
                             f"of expert_parallel_size={ep_size} (world size {world_size}); pick an "
                             "expert_parallel_size that divides every layer's num_experts")


def expert_shard(layer: MoE) -> ExpertShard | None:
    """The shard installed on ``layer`` by :func:`shard_moe_layer`, or None when it holds every expert."""
    dispatcher = layer.dispatcher
    return dispatcher.shard if isinstance(dispatcher, ShardedDispatcher) else None


def expert_group(layer: MoE) -> dist.ProcessGroup | None:
    """The process group ``layer``'s experts are sharded over, or None (every expert here, or simulated)."""
    dispatcher = layer.dispatcher
    return dispatcher.group if isinstance(dispatcher, ExpertParallelDispatcher) else None


def _module_tensors(module: nn.Module) -> list[Tensor]:
    return list(module.parameters()) + list(module.buffers())


def _expert_tensors(bank: nn.Module) -> list[tuple[str, Tensor]]:
    """Stacked tensors of a GroupedExperts bank (dim 0 = expert)."""
    return [(n, getattr(bank, n)) for n in GROUPED_PARAMS if getattr(bank, n, None) is not None]


@torch.no_grad()
def shard_moe_layer(
    layer: MoE,
    path: str,
    ep_rank: int,
    ep_size: int,
    group: dist.ProcessGroup | None,
) -> ExpertShard:
    """Keep only this rank's experts in ``layer`` and install the EP dispatcher.

    Args:
        layer: the MoE layer, holding all ``num_experts`` experts.
        path: its module path (used for state-dict names and error messages).
        ep_rank: this rank's index in ``group``.
        ep_size: size of ``group``; must divide ``layer.num_experts``.
        group: the EP process group (None only where the dispatcher never exchanges: a layer
            sharded for checkpoint layouts, or one whose dispatcher is replaced, as planning does).

    Returns:
        The :class:`ExpertShard` now held.

    Raises:
        ValueError: if the layer is already sharded or the sizes do not divide.
    """
    if expert_shard(layer) is not None:
        raise ValueError(f"shard_moe_layer: layer {path!r} is already sharded ({layer.expert_dispatcher}); "
                         "unshard it first")
    if layer.num_experts % ep_size:
        raise ValueError(f"shard_moe_layer: layer {path!r} num_experts={layer.num_experts} is not a multiple of "
                         f"ep_size={ep_size}")
    bank = layer.experts
    shard = ExpertShard(path, layer.num_experts, ep_size, ep_rank, isinstance(bank, TemplateExperts))
    lo, hi = shard.offset, shard.offset + shard.num_local
    if isinstance(bank, GroupedExperts):
        for name, param in _expert_tensors(bank):
            setattr(bank, name, nn.Parameter(param.detach()[lo:hi].clone(), requires_grad=param.requires_grad))
    elif isinstance(bank, TemplateExperts):
        bank.experts = nn.ModuleList(list(bank.experts)[lo:hi])
    else:
        raise ValueError(f"shard_moe_layer: layer {path!r} has experts of type {type(bank).__name__}; "
                         "expert parallelism supports GroupedExperts and TemplateExperts")
    bank.num_experts = shard.num_local
    bank.expert_offset = lo
    layer.expert_dispatcher = ExpertParallelDispatcher(shard, group)
    return shard


@torch.no_grad()
def unshard_moe_layer(layer: MoE) -> None:
    """Gather every expert back into ``layer`` (collective over its EP group) and remove the dispatcher.

    Every rank of the EP group must call it, for its layers in the same order.
    """
    shard = expert_shard(layer)
    if shard is None:
        return
    if not isinstance(layer.dispatcher, ExpertParallelDispatcher):
        raise ValueError(f"unshard_moe_layer: layer {shard.path!r} runs {layer.dispatcher!r}, which has no peers to "
                         "gather experts from; build the layer again instead")
    group = layer.dispatcher.group
    bank = layer.experts
    if shard.template:
        if not isinstance(bank, TemplateExperts):
            raise ValueError(f"unshard_moe_layer: layer {shard.path!r} was sharded as TemplateExperts but now holds "
                             f"{type(bank).__name__}; build the layer again instead")
        P, L = shard.ep_size, shard.num_local
        local = list(bank.experts)
        modules: dict[int, nn.Module] = {}  # global expert id -> module
        for i, module in enumerate(local):
            tensors = _module_tensors(module)
            gathered = [gather_experts(t, group, stack=True) for t in tensors]  # [P, *]: row r from EP rank r
            for r in range(P):
                replica = module if r == shard.ep_rank else copy.deepcopy(module)
                for tensor, full in zip(_module_tensors(replica), gathered, strict=True):
                    tensor.copy_(full[r])
                modules[r * L + i] = replica
        bank.experts = nn.ModuleList(modules[g] for g in range(shard.num_experts))
    else:
        for name, param in _expert_tensors(bank):
            setattr(bank, name, nn.Parameter(gather_experts(param, group), requires_grad=param.requires_grad))
    # torch types Module.__setattr__'s value as Tensor | Module, though any attribute value is allowed.
    bank.num_experts, bank.expert_offset = shard.num_experts, 0  # type: ignore[assignment]
    layer.expert_dispatcher = None


def expert_state_names(module: nn.Module) -> list[str]:
    """Names of every expert parameter/buffer and routing-stat buffer: the set DDP must ignore.

    Expert weights differ between ranks (each holds its own experts, or its own gradient sum),
    and the routing stats are rank-local, so DDP must neither broadcast nor all-reduce them.
    """
    names = []
    for path, layer in find_moe_layers(module):
        prefix = f"{path}." if path else ""
        names += [f"{prefix}experts.{n}" for n, _ in layer.experts.named_parameters()]
        names += [f"{prefix}experts.{n}" for n, _ in layer.experts.named_buffers()]
        names += [f"{prefix}{n}" for n in STAT_BUFFERS if hasattr(layer, n)]
    return names


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of every MoE layer's expert bank (shared experts and routers are dense)."""
    return [p for _, layer in find_moe_layers(module) for p in layer.experts.parameters()]
