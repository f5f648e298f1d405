"""The aux loss under reentrant activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``).

A reentrant checkpoint runs a block's forward without autograd, then runs it again inside backward and
back-propagates from the block's outputs only. The layer's aux loss of the first pass carries no graph,
and the one of the second pass is no output of the block: its gradient (into the router and, through the
layer's input, into the layers before) would be lost. So:

1. a training forward without autograd marks the layer (:func:`after_forward`): its aux loss needs the
   recompute;
2. :class:`~lightning_moe.MoELightningModule` adds such an aux loss to the step's loss through a probe
   (:func:`aux_loss_term`) whose backward records the factor the loss is scaled by on its way to
   ``backward`` (``1 / accumulate_grad_batches``, a GradScaler's scale). The probe runs before the
   checkpoint's recompute: it is created after the whole forward, and autograd runs the nodes created
   later first;
3. the recompute (a training forward with autograd on a marked layer whose factor is known) attaches its
   aux loss to the layer's output with that factor (:func:`after_forward`), so the block's backward
   carries the aux loss's gradient exactly as without checkpointing.

A non-reentrant checkpoint needs none of this: its first pass records the graph, aux loss included, and
its recompute only restores saved tensors. Either way the recompute records the same routing statistics
again (same input, same random state), and every consumer counts a layer once per step whatever its
``forward_count`` advanced by.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_STATE = "_aux_recompute"  # instance attribute of an MoE layer whose last training forward ran without autograd


@dataclass
class _Pending:
    probed: bool = False  # its aux loss is in a loss through a probe
    scale: Tensor | None = None  # d(loss being back-propagated) / d(aux loss), once the probe's backward ran


class _Probe(torch.autograd.Function):
    """Passes a graph-less aux loss into the loss; its backward records the gradient the loss gives it."""

    @staticmethod
    def forward(ctx: Any, aux: Tensor, anchor: Tensor, state: _Pending) -> Tensor:
        ctx.state = state
        return aux.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        ctx.state.scale = grad.detach()
        return None, None, None


class _Attach(torch.autograd.Function):
    """``out`` unchanged; backward also sends ``scale`` into ``aux`` (as if ``scale * aux`` were in the loss)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, aux: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        ctx.aux_shape = aux.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad_out, scale.expand(ctx.aux_shape), None


def after_forward(layer: nn.Module, out: Tensor, aux: Tensor) -> Tensor:
    """End of a layer's forward: mark a training forward without autograd; attach the aux loss to a recompute's output.

    Args:
        layer: the MoE layer.
        out: its output.
        aux: the aux loss of this forward.

    Returns:
        ``out``, through :class:`_Attach` when this forward is the recompute of a probed one.
    """
    if not layer.training:
        return out
    if not torch.is_grad_enabled():
        layer.__dict__[_STATE] = _Pending()
        return out
    state = layer.__dict__.pop(_STATE, None)
    if state is None:
        return out
    if state.scale is None:
        if state.probed:
            warnings.warn(f"{type(layer).__name__}: a forward ran again before the backward of the loss holding its "
                          "aux loss reached it; that aux loss gets no gradient. Under torch.utils.checkpoint use "
                          "use_reentrant=False, or return the aux loss with the loss of the same step", stacklevel=3)
        return out
    return _Attach.apply(out, aux, state.scale.to(aux.dtype))


def aux_loss_term(layer: nn.Module, aux: Tensor) -> Tensor:
    """The term that adds ``aux`` (``layer.aux_loss``) to a loss: itself, or a probe when it has no graph.

    Call it once per loss for each layer that ran (MoELightningModule does, and so does
    ``moe_aux_loss()`` for manual optimization).
    """
    state = layer.__dict__.get(_STATE)
    if state is None or aux.requires_grad or not torch.is_grad_enabled():
        return aux
    state.probed = True
    anchor = torch.zeros((), device=aux.device, requires_grad=True)
    return _Probe.apply(aux, anchor, state)
