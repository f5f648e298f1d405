"""The loops of the fused expert paths, without autograd: forward and backward of each expert on its rows.

:mod:`~lightning_moe.nn.ops.grouped_mlp` wraps them in autograd functions for eager mode, and
:mod:`~lightning_moe.nn.ops.compiled` in custom operators for ``torch.compile``; both differ only in where
each expert's activations live between forward and backward, so the loops take that as callbacks:

- forward: ``keep(e, acts)`` receives expert ``e``'s activations ``(h, a)`` or, for SwiGLU, ``(h, s, g, a)``
  (``s = silu(h)``, ``g = x w3``, ``a`` the input of ``w2``), plus the expert output ``y`` in the routed
  path; ``out_buffers(e, rows)`` may give preallocated views to write them into;
- backward: ``fetch(e, rows)`` returns what ``keep`` received for expert ``e``.

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

import torch
from torch import Tensor

# Activations with a fused path (others take the reference loop of GroupedExperts).
FUSED_ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
_ACT = {"gelu": torch.ops.aten.gelu, "relu": torch.ops.aten.relu, "silu": torch.ops.aten.silu}

Acts = tuple[Tensor, ...]
Keep = Callable[[int, Acts], None]
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


def expert_forward(x_CD: Tensor, e: int, w1: Tensor, w3: Tensor | None, b1: Tensor | None, activation: str,
                   out: tuple[Tensor | None, ...] | None = None) -> Acts:
    """Hidden layer of expert ``e``: ``(h, a)``, or ``(h, s, g, a)`` for SwiGLU (written into ``out`` if given)."""
    o = out or (None, None, None, None)
    h_CH = _mm(x_CD, w1[e], None if b1 is None else b1[e], o[0])
    if w3 is None:
        op = _ACT[activation]
        return h_CH, op.default(h_CH) if o[1] is None else op.out(h_CH, out=o[1])
    g_CH = _mm(x_CD, w3[e], None, o[2])
    s_CH = torch.ops.aten.silu.default(h_CH) if o[1] is None else torch.ops.aten.silu.out(h_CH, out=o[1])
    a_CH = s_CH * g_CH if o[3] is None else torch.mul(s_CH, g_CH, out=o[3])
    return h_CH, s_CH, g_CH, a_CH


def expert_backward(x_CD: Tensor, g_CD: Tensor, acts: Acts, e: int, weights: tuple, grads: tuple, activation: str,
                    gx_out: Tensor | None = None) -> Tensor | None:
    """Gradients of expert ``e``: weights' into ``grads[k][e]``; returns the input's (into ``gx_out`` if given).

    Args:
        weights: ``(w1, w2, w3)``.
        grads: ``(gw1, gw2, gw3, gb1, gb2, need_x)``, None for a gradient not needed.
    """
    w1, w2, w3 = weights
    gw1, gw2, gw3, gb1, gb2, need_x = grads
    a_CH = acts[-1]
    if gw2 is not None:
        torch.mm(a_CH.t(), g_CD, out=gw2[e])
    if gb2 is not None:
        torch.sum(g_CD, 0, out=gb2[e])
    ga_CH = g_CD @ w2[e].t()
    gg_CH = None  # SwiGLU: gradient of the gate input x w3
    if w3 is not None:
        h_CH, s_CH, g3_CH, _ = acts
        gg_CH = ga_CH * s_CH
        gh_CH = torch.ops.aten.silu_backward(ga_CH.mul_(g3_CH), h_CH)
        if gw3 is not None:
            torch.mm(x_CD.t(), gg_CH, out=gw3[e])
    elif activation == "gelu":
        gh_CH = torch.ops.aten.gelu_backward(ga_CH, acts[0])
    elif activation == "silu":
        gh_CH = torch.ops.aten.silu_backward(ga_CH, acts[0])
    else:  # relu
        gh_CH = ga_CH.masked_fill_(acts[0] <= 0, 0)
    if gb1 is not None:
        torch.sum(gh_CH, 0, out=gb1[e])
    if gw1 is not None:
        torch.mm(x_CD.t(), gh_CH, out=gw1[e])
    if not need_x:
        return None
    gx_CD = gh_CH @ w1[e].t() if gx_out is None else torch.mm(gh_CH, w1[e].t(), out=gx_out)
    return gx_CD if gg_CH is None else gx_CD.addmm_(gg_CH, w3[e].t())


def empty_grads(weights: Sequence[Tensor | None], needed: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """Gradient buffers (uninitialised) of the tensors whose gradient is needed."""
    return tuple(torch.empty_like(t) if t is not None and need else None
                 for t, need in zip(weights, needed, strict=True))


def _zero_expert(grads: Sequence[Tensor | None], e: int) -> None:
    for grad in grads:
        if grad is not None:
            grad[e].zero_()


def grouped_forward(x_MD: Tensor, counts: Sequence[int], w1: Tensor, w2: Tensor, w3: Tensor | None,
                    b1: Tensor | None, b2: Tensor | None, activation: str, keep: Keep,
                    out_buffers: Buffers = None) -> Tensor:
    """``y_MD``: expert ``e`` on rows ``counts[e]`` of ``x_MD``."""
    y_MD = x_MD.new_empty((x_MD.shape[0], w2.shape[-1]))
    for e, rows in expert_rows(counts):
        if rows.start == rows.stop:
            continue
        acts = expert_forward(x_MD[rows], e, w1, w3, b1, activation, out_buffers and out_buffers(e, rows))
        _mm(acts[-1], w2[e], None if b2 is None else b2[e], y_MD[rows])
        keep(e, acts)
    return y_MD


def grouped_backward(grad_MD: Tensor, x_MD: Tensor, counts: Sequence[int], weights: tuple, grads: tuple,
                     activation: str, fetch: Fetch) -> Tensor | None:
    """Weight gradients into ``grads``; returns ``gx_MD`` (None when ``grads[-1]`` says it is not needed)."""
    gx_MD = torch.empty_like(x_MD) if grads[-1] else None
    for e, rows in reversed(expert_rows(counts)):
        if rows.start == rows.stop:
            _zero_expert(grads[:-1], e)
            continue
        expert_backward(x_MD[rows], grad_MD[rows], fetch(e, rows), e, weights, grads, activation,
                        None if gx_MD is None else gx_MD[rows])
    return gx_MD


def routed_forward(x_TD: Tensor, token_N: Tensor, w_N: Tensor, counts: Sequence[int], w1: Tensor, w2: Tensor,
                   w3: Tensor | None, b1: Tensor | None, b2: Tensor | None, activation: str, keep: Keep,
                   out_buffers: Buffers = None) -> Tensor:
    """``out_TD``: per token, the sum over its kept rows of ``w * expert(x[token])``.

    Row ``m < sum(counts)`` of ``token_N``/``w_N`` belongs to the expert whose block holds it; later rows
    (dropped assignments) are ignored. ``keep`` also receives each expert's unweighted output ``y``, which
    the backward needs for the routing weights' gradient.
    """
    out_TD = x_TD.new_zeros((x_TD.shape[0], w2.shape[-1]))
    for e, rows in expert_rows(counts):
        if rows.start == rows.stop:
            continue
        token_C = token_N[rows]
        buffers = out_buffers(e, rows) if out_buffers is not None else (None,) * 5
        acts = expert_forward(x_TD.index_select(0, token_C), e, w1, w3, b1, activation, buffers[:-1])
        y_CD = _mm(acts[-1], w2[e], None if b2 is None else b2[e], buffers[-1])
        out_TD.index_add_(0, token_C, y_CD * w_N[rows, None])
        keep(e, (*acts, y_CD))
    return out_TD


def routed_backward(grad_TD: Tensor, x_TD: Tensor, token_N: Tensor, w_N: Tensor, counts: Sequence[int],
                    weights: tuple, grads: tuple, need_w: bool, activation: str,
                    fetch: Fetch) -> tuple[Tensor | None, Tensor | None]:
    """Weight gradients into ``grads``; returns ``(gx_TD, gw_N)`` (None where not needed; ``gw_N`` is 0 on
    dropped rows)."""
    need_x = grads[-1]
    gx_TD = torch.zeros_like(x_TD) if need_x else None
    gw_N = torch.zeros_like(w_N) if need_w else None
    for e, rows in reversed(expert_rows(counts)):
        if rows.start == rows.stop:
            _zero_expert(grads[:-1], e)
            continue
        acts = fetch(e, rows)
        token_C = token_N[rows]
        g_CD = grad_TD.index_select(0, token_C)  # each row's share of its token's output gradient
        if gw_N is not None:
            torch.sum(g_CD * acts[-1], dim=-1, out=gw_N[rows])
        g_CD.mul_(w_N[rows, None])
        gx_CD = expert_backward(x_TD.index_select(0, token_C), g_CD, acts[:-1], e, weights, grads, activation)
        del acts
        if gx_TD is not None:
            gx_TD.index_add_(0, token_C, gx_CD)
    return gx_TD, gw_N
