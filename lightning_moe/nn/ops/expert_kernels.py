"""The loops of the fused expert paths, without autograd: forward and backward of each expert on its rows.

:mod:`~lightning_moe.nn.ops.grouped_mlp` wraps them in autograd functions for eager mode, and
:mod:`~lightning_moe.nn.ops.compiled` in custom operators for ``torch.compile``; both differ only in where
each expert's activations live between forward and backward, so the loops take that as callbacks:

- forward: ``keep(key, tensors)`` receives expert ``e``'s activations ``(h, a)`` or, for SwiGLU,
  ``(h, s, g, a)`` (``s = silu(h)``, ``g = x w3``, ``a`` the input of ``w2``) under key ``e``, and in the
  routed path each group's expert outputs under key ``E + c``; ``out_buffers(key, rows)`` may give
  preallocated views (of the given global rows) to write them into;
- backward: ``fetch(key, rows)`` returns what ``keep`` received under ``key``.

Every GEMM writes into its destination (``torch.mm(..., out=)``); weight gradients go straight into their
``[E, D, H]`` buffers; per-expert temporaries stay small. The backward visits experts last first, as autograd
visits the per-expert nodes of the reference: the forward's last activations are the ones still in cache.

Shape legend (the package's, see :mod:`lightning_moe.nn.functional`): T tokens, N assignments, M rows kept
(the first ``sum(counts)`` of N), D model width, H expert hidden width, E experts held here, C rows of one
expert.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

# Activations with a fused path (others take the reference loop of GroupedExperts).
FUSED_ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
_ACT: dict[str, Callable[..., Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
_ACT_OUT = {"gelu": torch.ops.aten.gelu.out, "relu": torch.ops.aten.relu.out, "silu": torch.ops.aten.silu.out}
_SILU_BACKWARD = torch.ops.aten.silu_backward.default
_GELU_BACKWARD = torch.ops.aten.gelu_backward.default

Acts = tuple[Tensor, ...]
Keep = Callable[[int, Acts], None]  # (key, tensors); keys: experts 0..E-1, then the routed groups
Fetch = Callable[[int, slice], Acts]
Buffers = Callable[[int, slice], tuple[Tensor | None, ...]] | None


def expert_rows(counts: Sequence[int]) -> list[tuple[int, slice]]:
    """``(expert, its rows)`` for every expert, in expert order."""
    ends = list(itertools.accumulate(counts))
    return [(e, slice(end - count, end)) for e, (count, end) in enumerate(zip(counts, ends, strict=True))]


def _mm(x: Tensor, w: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mm(x, w) if out is None else torch.mm(x, w, out=out)
    return torch.addmm(bias, x, w) if out is None else torch.addmm(bias, x, w, out=out)


def expert_forward(x_CD: Tensor, w1: Tensor, w3: Tensor | None, b1: Tensor | None, activation: str,
                   out: tuple[Tensor | None, ...] | None = None) -> Acts:
    """Hidden layer of one expert (its weights ``w1 [D, H]``, ...): ``(h, a)``, or ``(h, s, g, a)`` for SwiGLU
    (written into ``out`` if given)."""
    o = out or (None, None, None, None)
    h_CH = _mm(x_CD, w1, b1, o[0])
    if w3 is None:
        return h_CH, _ACT[activation](h_CH) if o[1] is None else _ACT_OUT[activation](h_CH, out=o[1])
    g_CH = _mm(x_CD, w3, None, o[2])
    s_CH = F.silu(h_CH) if o[1] is None else _ACT_OUT["silu"](h_CH, out=o[1])
    a_CH = s_CH * g_CH if o[3] is None else torch.mul(s_CH, g_CH, out=o[3])
    return h_CH, s_CH, g_CH, a_CH


def _mm_grad(a: Tensor, b: Tensor, grad: Tensor, accumulate: bool) -> None:
    if accumulate:
        grad.addmm_(a, b)
    else:
        torch.mm(a, b, out=grad)


def _sum_grad(g: Tensor, grad: Tensor, accumulate: bool) -> None:
    if accumulate:
        grad.add_(g.sum(0))
    else:
        torch.sum(g, 0, out=grad)


def expert_backward(x_CD: Tensor, g_CD: Tensor, acts: Acts, weights: tuple, grads: tuple, activation: str,
                    gx_out: Tensor | None = None, accumulate: bool = False) -> Tensor | None:
    """Gradients of one expert: its weights' written (or, ``accumulate``, added) into ``grads``; returns the
    input's (into ``gx_out`` if given).

    Args:
        weights: the expert's ``(w1, w2, w3)`` (``[D, H]``, ``[H, D]``, ``[D, H]`` or None).
        grads: its ``(gw1, gw2, gw3, gb1, gb2)`` views, None for a gradient not needed, then ``need_x``.
    """
    w1, w2, w3 = weights
    gw1, gw2, gw3, gb1, gb2, need_x = grads
    a_CH = acts[-1]
    if gw2 is not None:
        _mm_grad(a_CH.t(), g_CD, gw2, accumulate)
    if gb2 is not None:
        _sum_grad(g_CD, gb2, accumulate)
    ga_CH = torch.mm(g_CD, w2.t())
    gg_CH = None  # SwiGLU: gradient of the gate input x w3
    if w3 is not None:
        h_CH, s_CH, g3_CH, _ = acts
        gg_CH = ga_CH * s_CH
        gh_CH = _SILU_BACKWARD(ga_CH.mul_(g3_CH), h_CH)
        if gw3 is not None:
            _mm_grad(x_CD.t(), gg_CH, gw3, accumulate)
    elif activation == "gelu":
        gh_CH = _GELU_BACKWARD(ga_CH, acts[0])
    elif activation == "silu":
        gh_CH = _SILU_BACKWARD(ga_CH, acts[0])
    else:  # relu
        gh_CH = ga_CH.masked_fill_(acts[0] <= 0, 0)
    if gb1 is not None:
        _sum_grad(gh_CH, gb1, accumulate)
    if gw1 is not None:
        _mm_grad(x_CD.t(), gh_CH, gw1, accumulate)
    if not need_x:
        return None
    gx_CD = torch.mm(gh_CH, w1.t()) if gx_out is None else torch.mm(gh_CH, w1.t(), out=gx_out)
    return gx_CD if gg_CH is None else gx_CD.addmm_(gg_CH, w3.t())


def empty_grads(weights: Sequence[Tensor | None], needed: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """Gradient buffers (uninitialised) of the tensors whose gradient is needed."""
    return tuple(torch.empty_like(t) if t is not None and need else None
                 for t, need in zip(weights, needed, strict=True))


def _per_expert(tensors: Sequence[Tensor | None], num_experts: int) -> list[tuple]:
    """``[(t[e] for t in tensors) for e]``, one unbind per tensor instead of a select per expert and tensor."""
    views = [t.unbind(0) if t is not None else (None,) * num_experts for t in tensors]
    return list(zip(*views, strict=True))


def _zero_expert(grads: Sequence[Tensor | None]) -> None:
    for grad in grads:
        if grad is not None:
            grad.zero_()


def grouped_forward(x_MD: Tensor, counts: Sequence[int], w1: Tensor, w2: Tensor, w3: Tensor | None,
                    b1: Tensor | None, b2: Tensor | None, activation: str, keep: Keep,
                    out_buffers: Buffers = None, segment_experts: Sequence[int] | None = None,
                    y_out: Tensor | None = None) -> Tensor:
    """``y_MD``: segment ``i`` (``counts[i]`` rows of ``x_MD``) through expert ``segment_experts[i]`` (default
    ``i``), into ``y_out`` when given; ``keep(i, acts)`` per segment."""
    y_MD = x_MD.new_empty((x_MD.shape[0], w2.shape[-1])) if y_out is None else y_out
    params = _per_expert((w1, w2, w3, b1, b2), w1.shape[0])
    for i, rows in expert_rows(counts):
        if rows.start == rows.stop:
            continue
        e_w1, e_w2, e_w3, e_b1, e_b2 = params[i if segment_experts is None else segment_experts[i]]
        acts = expert_forward(x_MD[rows], e_w1, e_w3, e_b1, activation, out_buffers and out_buffers(i, rows))
        _mm(acts[-1], e_w2, e_b2, y_MD[rows])
        keep(i, acts)
    return y_MD


def grouped_backward(grad_MD: Tensor, x_MD: Tensor, counts: Sequence[int], weights: tuple, grads: tuple,
                     activation: str, fetch: Fetch, segment_experts: Sequence[int] | None = None,
                     written: set[int] | None = None, gx_out: Tensor | None = None) -> Tensor | None:
    """Backward of :func:`grouped_forward`: weight gradients into ``grads``; returns ``gx_MD`` (into ``gx_out``
    when given; None when ``grads[-1]`` says it is not needed).

    An expert in several segments sums their gradients. ``written``: the experts whose gradient a previous call
    already wrote (this call adds to them, and records the ones it writes); without it, this call writes every
    expert's gradient itself, zeros for an expert without rows.
    """
    gx_MD = (torch.empty_like(x_MD) if gx_out is None else gx_out) if grads[-1] else None
    num_experts = weights[0].shape[0]
    params, expert_grads = _per_expert(weights, num_experts), _per_expert(grads[:-1], num_experts)
    done: set[int] = set() if written is None else written
    for i, rows in reversed(expert_rows(counts)):
        if rows.start == rows.stop:
            continue
        e = i if segment_experts is None else segment_experts[i]
        expert_backward(x_MD[rows], grad_MD[rows], fetch(i, rows), params[e], (*expert_grads[e], grads[-1]),
                        activation, None if gx_MD is None else gx_MD[rows], accumulate=e in done)
        done.add(e)
    if written is None:
        for e in range(num_experts):
            if e not in done:
                _zero_expert(expert_grads[e])
    return gx_MD


# Rows per group of experts whose gathers, scatters and scaling run as one op (a few hundred KB per tensor):
# small experts share them (fewer, larger ops), large experts get a group each (temporaries stay cache-sized).
CHUNK_ELEMENTS = 1 << 18


def expert_chunks(counts: Sequence[int], width: int) -> list[tuple[slice, list[tuple[int, slice]]]]:
    """Consecutive experts grouped while a group's rows x ``width`` stay under :data:`CHUNK_ELEMENTS` (one expert
    at least): per group its rows and, per expert, ``(expert, its rows within the group)``."""
    limit = max(1, CHUNK_ELEMENTS // max(width, 1))
    chunks: list[tuple[slice, list[tuple[int, slice]]]] = []
    start = 0
    members: list[tuple[int, slice]] = []
    for e, rows in expert_rows(counts):
        if members and rows.stop - start > limit:
            chunks.append((slice(start, rows.start), members))
            start, members = rows.start, []
        members.append((e, slice(rows.start - start, rows.stop - start)))
    chunks.append((slice(start, start + sum(counts[e] for e, _ in members)), members))
    return chunks


def routed_forward(x_TD: Tensor, token_N: Tensor, w_N: Tensor, counts: Sequence[int], w1: Tensor, w2: Tensor,
                   w3: Tensor | None, b1: Tensor | None, b2: Tensor | None, activation: str, keep: Keep,
                   out_buffers: Buffers = None) -> Tensor:
    """``out_TD``: per token, the sum over its kept rows of ``w * expert(x[token])``.

    Row ``m < sum(counts)`` of ``token_N``/``w_N`` belongs to the expert whose block holds it; later rows
    (dropped assignments) are ignored. Experts run in groups (:func:`expert_chunks`): one gather, one
    scaling and one scatter per group. ``keep(e, acts)`` receives each expert's activations, and
    ``keep(E + c, (y,))`` group ``c``'s unweighted outputs, which the backward needs for the routing
    weights' gradient (``out_buffers`` takes the same keys, with the global rows).
    """
    num_experts = len(counts)
    out_TD = x_TD.new_zeros((x_TD.shape[0], w2.shape[-1]))
    params = _per_expert((w1, w2, w3, b1, b2), num_experts)
    w_N1 = w_N[:, None]
    for c, (rows_K, members) in enumerate(expert_chunks(counts, x_TD.shape[-1])):
        if rows_K.start == rows_K.stop:
            continue
        token_K = token_N[rows_K]
        x_KD = x_TD.index_select(0, token_K)
        y_KD = cast(Tensor, out_buffers(num_experts + c, rows_K)[0]) if out_buffers is not None else \
            x_KD.new_empty((x_KD.shape[0], w2.shape[-1]))
        for e, sub in members:
            if sub.start == sub.stop:
                continue
            e_w1, e_w2, e_w3, e_b1, e_b2 = params[e]
            rows = slice(rows_K.start + sub.start, rows_K.start + sub.stop)
            acts = expert_forward(x_KD[sub], e_w1, e_w3, e_b1, activation, out_buffers and out_buffers(e, rows))
            _mm(acts[-1], e_w2, e_b2, y_KD[sub])
            keep(e, acts)
        out_TD.index_add_(0, token_K, y_KD * w_N1[rows_K])
        keep(num_experts + c, (y_KD,))
    return out_TD


def routed_backward(grad_TD: Tensor, x_TD: Tensor, token_N: Tensor, w_N: Tensor, counts: Sequence[int],
                    weights: tuple, grads: tuple, need_w: bool, activation: str,
                    fetch: Fetch) -> tuple[Tensor | None, Tensor | None]:
    """Weight gradients into ``grads``; returns ``(gx_TD, gw_N)`` (None where not needed; ``gw_N`` is 0 on
    dropped rows)."""
    num_experts, need_x = len(counts), grads[-1]
    gx_TD = torch.zeros_like(x_TD) if need_x else None
    gw_N = torch.zeros_like(w_N) if need_w else None
    params, expert_grads = _per_expert(weights, num_experts), _per_expert(grads[:-1], num_experts)
    w_N1 = w_N[:, None]
    for c, (rows_K, members) in reversed(list(enumerate(expert_chunks(counts, x_TD.shape[-1])))):
        if rows_K.start == rows_K.stop:
            for e, _ in members:
                _zero_expert(expert_grads[e])
            continue
        token_K = token_N[rows_K]
        g_KD = grad_TD.index_select(0, token_K)  # each row's share of its token's output gradient
        (y_KD,) = fetch(num_experts + c, rows_K)
        if gw_N is not None:
            torch.sum(g_KD * y_KD, dim=-1, out=gw_N[rows_K])
        del y_KD
        g_KD.mul_(w_N1[rows_K])
        x_KD = x_TD.index_select(0, token_K)
        gx_KD = torch.empty_like(x_KD) if need_x else None
        for e, sub in reversed(members):
            if sub.start == sub.stop:
                _zero_expert(expert_grads[e])
                continue
            acts = fetch(e, slice(rows_K.start + sub.start, rows_K.start + sub.stop))
            expert_backward(x_KD[sub], g_KD[sub], acts, params[e], (*expert_grads[e], need_x), activation,
                            None if gx_KD is None else gx_KD[sub])
            del acts
        if gx_TD is not None:
            gx_TD.index_add_(0, token_K, cast(Tensor, gx_KD))  # not None: need_x
    return gx_TD, gw_N
