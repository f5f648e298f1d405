"""The expert-parallel exchange with the local experts' work overlapping the all-to-alls.

:class:`~lightning_moe.distributed.ShardedDispatcher` writes the sequence as four steps (rows out, regroup,
experts, rows back), each waiting for the previous one, with autograd running the reverse. Yet the rows a
rank keeps for its own experts never travel, so their expert work need not wait for the exchange:

- forward: start the rows' all-to-all, run the experts on this rank's own rows meanwhile, wait, run them on
  the received rows, source by source (no regrouping gather), send the outputs back;
- backward: start the output gradients' all-to-all, run the own rows' backward meanwhile, wait, run the
  received rows' backward, send the input gradients back.

Each expert's weight gradients sum over the sources (and are written in place, as in the local fused path,
:mod:`~lightning_moe.nn.ops.expert_kernels`). :func:`overlapped_experts` is used by
:class:`~lightning_moe.distributed.ExpertParallelDispatcher` for :class:`~lightning_moe.nn.GroupedExperts`
with an activation the fused kernels implement; ``tests/test_expert_parallel_overlap.py`` checks it against
the sequential exchange on 2 gloo ranks (values and gradients). Every rank runs both exchanges forward and
backward, whatever it holds (zero-row splits included).

Shape legend (the package's, see :mod:`lightning_moe.nn.functional`): M rows this rank sends (grouped by
destination rank, then by its local expert), R rows it receives (grouped by source rank, then by local
expert), D model width, P ranks of the group, L local experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_moe import _compat
from lightning_moe.distributed.all_to_all import all_to_all_start, all_to_all_wait
from lightning_moe.nn.dispatch import DispatchPlan
from lightning_moe.nn.ops import expert_kernels as K


def overlapped_experts(x_MD: Tensor, plan: DispatchPlan, rank: int, group: dist.ProcessGroup | None,
                       params: Sequence[Tensor | None], activation: str) -> Tensor:
    """Rows out, experts, rows back, with this rank's own rows computed while the exchanges travel.

    Args:
        x_MD: rows to send, grouped by destination rank and its local expert (``plan.input_splits``), in the
            dtype of ``params``.
        plan: the dispatch plan (``received_counts`` on the host).
        rank: this rank's index in ``group``.
        group: the expert-parallel process group.
        params: the local experts' ``[w1, w2, w3, b1, b2]`` (``[L, ...]``, None where absent).
        activation: one of :data:`~lightning_moe.nn.ops.expert_kernels.FUSED_ACTIVATIONS`.

    Returns:
        ``y_MD``: the expert output of each row of ``x_MD``, in its order.
    """
    record = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_MD, *params))
    return _Overlapped.apply(x_MD, *params, plan, rank, group, activation, record)


class _Layout:
    """Where each source's and destination's rows sit, and the per-expert segments of each."""

    def __init__(self, plan: DispatchPlan, rank: int, num_local: int) -> None:
        self.rank, self.num_local = rank, num_local
        self.sources = range(len(plan.output_splits))
        self.received = [plan.received_counts[s * num_local:(s + 1) * num_local] for s in self.sources]
        self.src_rows = _blocks(plan.output_splits)  # in x_RD / y_RD, per source
        self.own_sent = _blocks(plan.input_splits)[rank]  # in x_MD / y_MD, the rows this rank keeps


def _blocks(splits) -> list[slice]:
    out, start = [], 0
    for n in splits:
        out.append(slice(start, start + n))
        start += n
    return out


class _Store:
    """Saved activations per (source, local expert), each released right after its backward."""

    def __init__(self, slots: int, record: bool) -> None:
        self.saved: list[tuple | None] | None = [None] * slots if record else None

    def keeper(self, offset: int):
        def keep(i: int, acts: K.Acts) -> None:
            if self.saved is not None:
                self.saved[offset + i] = tuple(_compat.make_saved_tensor(t) for t in acts)
        return keep

    def fetcher(self, offset: int):
        def fetch(i: int, rows: slice) -> K.Acts:
            saved = self.saved
            packed = saved[offset + i] if saved is not None else None
            if saved is None or packed is None:
                raise RuntimeError("lightning_moe expert parallelism: backward ran twice through one forward; the "
                                   "first freed the saved activations (run the forward again)")
            saved[offset + i] = None
            return tuple(s.unpack() for s in packed)
        return fetch


class _Overlapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_MD: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, b1: Tensor | None,
                b2: Tensor | None, plan: DispatchPlan, rank: int, group: dist.ProcessGroup | None,
                activation: str, record: bool) -> Tensor:
        num_local = w1.shape[0]
        lay = _Layout(plan, rank, num_local)
        store = _Store(len(lay.sources) * num_local, record)
        weights = (w1, w2, w3, b1, b2)
        # 1. rows out; this rank's own rows start on their experts meanwhile (output rows source-major).
        sent = all_to_all_start(x_MD, plan.output_splits, plan.input_splits, group)
        y_RD = x_MD.new_empty((plan.num_received, w2.shape[-1]))
        with torch.autocast(x_MD.device.type, enabled=False):
            K.grouped_forward(x_MD[lay.own_sent], lay.received[rank], *weights, activation,
                              store.keeper(rank * num_local), y_out=y_RD[lay.src_rows[rank]])
            x_RD = all_to_all_wait(sent)
            # 2. the received rows, source by source: each source's rows are already grouped by local expert.
            for s in lay.sources:
                if s != rank:
                    K.grouped_forward(x_RD[lay.src_rows[s]], lay.received[s], *weights, activation,
                                      store.keeper(s * num_local), y_out=y_RD[lay.src_rows[s]])
        # 3. outputs back, in the order the rows were sent.
        y_MD = all_to_all_wait(all_to_all_start(y_RD, plan.input_splits, plan.output_splits, group))
        ctx.store, ctx.plan, ctx.rank, ctx.group, ctx.activation = store, plan, rank, group, activation
        ctx.save_for_backward(x_MD, x_RD, w1, w2, w3, b1, b2)
        return y_MD

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_MD: Tensor):
        x_MD, x_RD, w1, w2, w3, b1, b2 = ctx.saved_tensors
        plan, rank, group, store = ctx.plan, ctx.rank, ctx.group, ctx.store
        num_local = w1.shape[0]
        lay = _Layout(plan, rank, num_local)
        need_x = ctx.needs_input_grad[0]
        grads = K.empty_grads((w1, w2, w3, b1, b2), ctx.needs_input_grad[1:6])
        written: set[int] = set()
        grad_MD = grad_MD.contiguous()
        # 1. output gradients to the ranks whose experts made those rows; this rank's own rows meanwhile.
        sent = all_to_all_start(grad_MD, plan.output_splits, plan.input_splits, group)
        gx_RD = x_RD.new_empty(x_RD.shape) if need_x else None
        with torch.autocast(x_MD.device.type, enabled=False):
            own = lay.src_rows[rank]
            K.grouped_backward(grad_MD[lay.own_sent], x_MD[lay.own_sent], lay.received[rank], (w1, w2, w3),
                               (*grads, need_x), ctx.activation, store.fetcher(rank * num_local), written=written,
                               gx_out=None if gx_RD is None else gx_RD[own])
            g_RD = all_to_all_wait(sent)
            # 2. the received rows' backward, source by source.
            for s in reversed(lay.sources):
                if s != rank:
                    rows = lay.src_rows[s]
                    K.grouped_backward(g_RD[rows], x_RD[rows], lay.received[s], (w1, w2, w3), (*grads, need_x),
                                       ctx.activation, store.fetcher(s * num_local), written=written,
                                       gx_out=None if gx_RD is None else gx_RD[rows])
        for e in range(num_local):
            if e not in written:
                for grad in grads:
                    if grad is not None:
                        grad[e].zero_()
        store.saved = None
        ctx.group = None  # the graph node may outlive the step: it must not keep the group (and its threads) alive
        # 3. input gradients back to the ranks that sent the rows (every rank runs it, whatever it needs).
        gx_RD = gx_RD if gx_RD is not None else x_RD.new_zeros(x_RD.shape)
        gx_MD = all_to_all_wait(all_to_all_start(gx_RD, plan.input_splits, plan.output_splits, group))
        return (gx_MD if need_x else None, *grads, None, None, None, None, None)
