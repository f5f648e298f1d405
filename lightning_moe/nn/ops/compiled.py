"""``torch.compile``'s view of the fused local experts: custom operators the compiler does not look into.

Under ``torch.compile`` :func:`~lightning_moe.nn.ops.grouped_mlp.routed_mlp` calls :func:`routed_mlp` here:
the same loops (:mod:`~lightning_moe.nn.ops.expert_kernels`) behind ``torch.library`` custom operators with
shape functions, so the compiler traces the routing around them and leaves the experts alone:

- the per-expert counts enter as a tensor and are read on the host inside the operator, so the host sync
  of the layer is no graph break, and no count becomes a Python int the compiler would guard on (and
  recompile for);
- the activations the backward needs are outputs of the forward operator (``[N, H]`` buffers written in
  place, rows past the kept ones unused), saved by AOTAutograd like any other, which frees them after the
  backward (the eager path frees them expert by expert instead).

Shape legend (the package's, see :mod:`lightning_moe.nn.functional`): T tokens, N assignments (M of them
kept), D model width, H expert hidden width, E experts held here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_moe.nn.ops import expert_kernels as K


def routed_mlp(x_TD: Tensor, token_N: Tensor, weights_N: Tensor, counts_E: Tensor, w1: Tensor, w2: Tensor,
               w3: Tensor | None, b1: Tensor | None, b2: Tensor | None, activation: str) -> Tensor:
    """:func:`~lightning_moe.nn.ops.grouped_mlp.routed_mlp` as custom operators (same arguments, counts a tensor)."""
    out_TD, *_ = torch.ops.lightning_moe.routed_mlp_fwd(
        x_TD, token_N, weights_N.to(x_TD.dtype), counts_E, w1, w2, w3, b1, b2, activation)
    return out_TD


def _buffers(x_TD: Tensor, n: int, w1: Tensor, w2: Tensor, swiglu: bool) -> list[Tensor]:
    """``[h, s, g, a, y]`` for all N rows (``s``, ``g``: SwiGLU only, else empty)."""
    hidden = w1.shape[-1]
    h, a = x_TD.new_empty((n, hidden)), x_TD.new_empty((n, hidden))
    rows = n if swiglu else 0
    s, g = x_TD.new_empty((rows, hidden)), x_TD.new_empty((rows, hidden))
    return [h, s, g, a, x_TD.new_empty((n, w2.shape[-1]))]


@torch.library.custom_op("lightning_moe::routed_mlp_fwd", mutates_args=())
def _routed_fwd(x_TD: Tensor, token_N: Tensor, w_N: Tensor, counts_E: Tensor, w1: Tensor, w2: Tensor,
                w3: Tensor | None, b1: Tensor | None, b2: Tensor | None,
                activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    h, s, g, a, y = _buffers(x_TD, token_N.shape[0], w1, w2, w3 is not None)

    num_experts = w1.shape[0]

    def out_buffers(key: int, rows: slice) -> tuple[Tensor | None, ...]:
        if key >= num_experts:  # a routed group's expert outputs
            return (y[rows],)
        return (h[rows], s[rows], g[rows], a[rows]) if w3 is not None else (h[rows], a[rows], None, None)

    # NOTE: host sync: the per-expert GEMMs need their sizes (inside the operator: no graph break).
    counts = counts_E.tolist()
    with torch.autocast(x_TD.device.type, enabled=False):
        out_TD = K.routed_forward(x_TD, token_N, w_N, counts, w1, w2, w3, b1, b2, activation,
                                  keep=lambda e, acts: None, out_buffers=out_buffers)
    return out_TD, h, s, g, a, y


@_routed_fwd.register_fake
def _(x_TD, token_N, w_N, counts_E, w1, w2, w3, b1, b2, activation):
    return (x_TD.new_empty((x_TD.shape[0], w2.shape[-1])), *_buffers(x_TD, token_N.shape[0], w1, w2, w3 is not None))


@torch.library.custom_op("lightning_moe::routed_mlp_bwd", mutates_args=())
def _routed_bwd(grad_TD: Tensor, x_TD: Tensor, token_N: Tensor, w_N: Tensor, counts_E: Tensor, w1: Tensor,
                w2: Tensor, w3: Tensor | None, b1: Tensor | None, b2: Tensor | None, h: Tensor, s: Tensor,
                g: Tensor, a: Tensor, y: Tensor, activation: str, needs: list[bool]) -> list[Tensor]:
    """Gradients ``[x_TD, w_N, w1, w2, w3, b1, b2]``, an empty tensor for each one not needed."""
    need_x, need_w, *need_params = needs
    grads = K.empty_grads((w1, w2, w3, b1, b2), need_params)

    def fetch(key: int, rows: slice) -> K.Acts:
        if key >= w1.shape[0]:
            return (y[rows],)
        return (h[rows], s[rows], g[rows], a[rows]) if w3 is not None else (h[rows], a[rows])

    with torch.autocast(x_TD.device.type, enabled=False):
        gx_TD, gw_N = K.routed_backward(grad_TD.contiguous(), x_TD, token_N, w_N, counts_E.tolist(), (w1, w2, w3),
                                        (*grads, need_x), need_w, activation, fetch)
    return [t if t is not None else x_TD.new_empty(0) for t in (gx_TD, gw_N, *grads)]


@_routed_bwd.register_fake
def _(grad_TD, x_TD, token_N, w_N, counts_E, w1, w2, w3, b1, b2, h, s, g, a, y, activation, needs):
    like = (x_TD, w_N, w1, w2, w3, b1, b2)
    return [torch.empty_like(t) if t is not None and need else x_TD.new_empty(0)
            for t, need in zip(like, needs, strict=True)]


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x_TD, token_N, w_N, counts_E, w1, w2, w3, b1, b2, activation = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x_TD, token_N, w_N, counts_E, w1, w2, w3, b1, b2, *output[1:])
    ctx.activation = activation


def _backward(ctx: Any, grad_TD: Tensor, *_unused: Any) -> tuple:
    x_TD, token_N, w_N, counts_E, w1, w2, w3, b1, b2, h, s, g, a, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[2], need[4], need[5], need[6] and w3 is not None, need[7] and b1 is not None,
             need[8] and b2 is not None]
    grads = torch.ops.lightning_moe.routed_mlp_bwd(grad_TD, x_TD, token_N, w_N, counts_E, w1, w2, w3, b1, b2,
                                                   h, s, g, a, y, ctx.activation, needs)
    gx, gw, gw1, gw2, gw3, gb1, gb2 = (grad if n else None for grad, n in zip(grads, needs, strict=True))
    return gx, None, gw, None, gw1, gw2, gw3, gb1, gb2, None


_routed_fwd.register_autograd(_backward, setup_context=_setup_context)
