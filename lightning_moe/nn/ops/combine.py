"""The weighted combine of an MoE layer: expert outputs, scaled by routing weights, summed back per token.

``out_TD[t] = sum over rows m of token t: weights_M[m] * y_MD[m]`` (rows of one token are its kept
assignments; a token with none gets zeros).

:func:`weighted_combine_reference` writes it with autograd ops. Their backward keeps the scaled rows
``y * w`` alive (out-of-place ``index_add``/``scatter_add`` save their whole source) next to ``y`` itself
(saved by the multiplication for the weights' gradient): two ``[M, D]`` copies. :func:`weighted_combine`
saves only ``y_MD``, the weights and the token index, scales rows in chunks of a few MB, and computes both
gradients from one gather of the output gradient. ``tests/test_perf_paths.py`` checks it against the reference
(values and gradients).

Shape legend (the package's, see :mod:`lightning_moe.nn.functional`): T tokens, D model width, M rows
(kept assignments).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def weighted_combine_reference(y_MD: Tensor, weights_M: Tensor, token_M: Tensor, num_tokens: int) -> Tensor:
    """Reference: ``zeros[T, D].index_add(0, token_M, y_MD * weights_M)`` with autograd ops.

    Args:
        y_MD: expert outputs, one row per kept assignment.
        weights_M: routing weight of each row (any float dtype; cast to ``y_MD``'s).
        token_M: token index of each row (int64).
        num_tokens: T.

    Returns:
        ``out_TD`` in ``y_MD``'s dtype.
    """
    scaled_MD = y_MD * weights_M.to(y_MD.dtype)[:, None]
    return y_MD.new_zeros((num_tokens, y_MD.shape[-1])).index_add(0, token_M, scaled_MD)


def weighted_combine(y_MD: Tensor, weights_M: Tensor, token_M: Tensor, num_tokens: int) -> Tensor:
    """Fast path of :func:`weighted_combine_reference` (same arguments, same result).

    Example:
        >>> y, w, token = torch.ones(3, 2), torch.tensor([0.5, 0.25, 1.0]), torch.tensor([1, 1, 0])
        >>> weighted_combine(y, w, token, num_tokens=3)
        tensor([[1.0000, 1.0000],
                [0.7500, 0.7500],
                [0.0000, 0.0000]])
    """
    return _WeightedCombine.apply(y_MD, weights_M, token_M, num_tokens)


# Rows per chunk of the scaled rows and of the weights' gradient: a few MB of temporaries instead of [M, D].
_CHUNK_ELEMENTS = 1 << 19


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _WeightedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_MD: Tensor, weights_M: Tensor, token_M: Tensor, num_tokens: int) -> Tensor:
        w_M = weights_M.to(y_MD.dtype)
        out_TD = y_MD.new_zeros((num_tokens, y_MD.shape[-1]))
        for rows in _row_chunks(*y_MD.shape):
            out_TD.index_add_(0, token_M[rows], y_MD[rows] * w_M[rows, None])
        ctx.save_for_backward(y_MD, w_M, token_M)
        ctx.weights_dtype = weights_M.dtype
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_TD: Tensor):
        y_MD, w_M, token_M = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        g_MD = grad_TD.index_select(0, token_M)  # each row's share of its token's output gradient
        grad_w = None
        if need_w:
            grad_w = torch.empty_like(w_M)
            for rows in _row_chunks(*y_MD.shape):
                torch.sum(g_MD[rows] * y_MD[rows], dim=-1, out=grad_w[rows])
            grad_w = grad_w.to(ctx.weights_dtype)
        grad_y = g_MD.mul_(w_M[:, None]) if need_y else None
        return grad_y, grad_w, None, None
