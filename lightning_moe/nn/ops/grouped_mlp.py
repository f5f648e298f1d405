"""The experts' feed-forward on rows grouped by expert: fused fast paths and the references they are tested against.

Expert ``e`` computes ``w2(act(x w1))``, or ``w2(silu(x w1) * (x w3))`` for SwiGLU (biases optional), on its
``counts[e]`` rows. Two entry points:

- :func:`grouped_mlp` ``(x_MD, counts, ...) -> y_MD``: rows already gathered and grouped by expert (what an
  expert-parallel rank receives). Reference: :func:`grouped_mlp_reference`.
- :func:`routed_mlp` ``(x_TD, token_N, weights_N, counts, ...) -> out_TD``: the whole local MoE data path,
  gather + experts + weighted combine, expert by expert. Reference: :func:`routed_mlp_reference` (the three
  steps one after the other, with autograd ops). Under ``torch.compile`` it runs as custom operators
  (:mod:`~lightning_moe.nn.ops.compiled`).

Why fused: the readable version pays for what sits between the GEMMs. The backward of ``w[e]`` slices stacks
``E`` per-expert gradients into a second full-size ``[E, D, H]`` buffer; outputs and input gradients are
concatenated copies; the gathered rows ``x_MD``, the expert outputs ``y_MD`` and the scaled outputs are
``[M, D]`` buffers that autograd keeps until the backward reaches them (and fresh large buffers cost page
faults on CPU). The fused paths run the same GEMMs with ``torch.mm(..., out=)`` into buffers allocated once,
write weight gradients in place into their ``[E, D, H]`` buffers, keep every per-expert temporary small
(cache-sized), and free each expert's saved activations as soon as its backward ran, as autograd does for
the per-expert graph of the reference. Same FLOPs; ``tests/test_perf_paths.py`` checks values and
gradients against the references. The loops themselves are in :mod:`~lightning_moe.nn.ops.expert_kernels`.

Shape legend (the package's, see :mod:`lightning_moe.nn.functional`): T tokens, N assignments (rows), M rows
kept (the first ``sum(counts)``), D model width, H expert hidden width, E experts held here, C rows of one expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_moe import _compat
from lightning_moe.nn.ops import compiled
from lightning_moe.nn.ops import expert_kernels as K
from lightning_moe.nn.ops.combine import weighted_combine_reference
from lightning_moe.nn.ops.expert_kernels import FUSED_ACTIVATIONS

_ELEMENTWISE: dict[str, Callable[..., Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def grouped_mlp_reference(x_MD: Tensor, counts: Sequence[int], w1: Tensor, w2: Tensor, w3: Tensor | None = None,
                          b1: Tensor | None = None, b2: Tensor | None = None, activation: str = "gelu") -> Tensor:
    """Reference: expert ``e`` runs on ``x_MD``'s ``counts[e]`` rows with plain autograd ops.

    Args:
        x_MD: rows grouped by expert, in expert order.
        counts: rows per expert (host ints, sum ``M``).
        w1: ``[E, D, H]``; w2: ``[E, H, D]``; w3: ``[E, D, H]`` (SwiGLU's gate input) or None.
        b1: ``[E, H]`` or None; b2: ``[E, D]`` or None.
        activation: ``"gelu" | "relu" | "silu" | "swiglu"``.

    Returns:
        ``y_MD`` in ``x_MD``'s row order.
    """
    # unbind, not w[e]: the backward of E separate w[e] selects materialises E full-size zero gradients.
    params: list[Sequence[Any]] = [p.unbind(0) if p is not None else [None] * len(counts) for p in (w1, w2, w3, b1, b2)]
    outputs = []
    for e, x_CD in enumerate(torch.split(x_MD, list(counts))):
        if x_CD.shape[0] == 0:
            continue
        e_w1, e_w2, e_w3, e_b1, e_b2 = (p[e] for p in params)
        h_CH = x_CD @ e_w1 if e_b1 is None else torch.addmm(e_b1, x_CD, e_w1)
        h_CH = F.silu(h_CH) * (x_CD @ e_w3) if activation == "swiglu" else _ELEMENTWISE[activation](h_CH)
        outputs.append(h_CH @ e_w2 if e_b2 is None else torch.addmm(e_b2, h_CH, e_w2))
    if not outputs:
        return x_MD.new_zeros((0, w2.shape[-1]))
    return torch.cat(outputs)


def routed_mlp_reference(x_TD: Tensor, token_N: Tensor, weights_N: Tensor, counts: Sequence[int] | Tensor,
                         w1: Tensor, w2: Tensor, w3: Tensor | None = None, b1: Tensor | None = None,
                         b2: Tensor | None = None, activation: str = "gelu") -> Tensor:
    """Reference: gather ``x_TD[token_M]``, :func:`grouped_mlp_reference`, weighted combine back per token.

    Args:
        x_TD: tokens.
        token_N: token of each row, rows grouped by expert (``counts[e]`` rows for expert ``e``); rows past
            ``sum(counts)`` (dropped assignments) are ignored.
        weights_N: routing weight of each row.
        counts, w1, w2, w3, b1, b2, activation: as for :func:`grouped_mlp_reference` (counts may be a tensor).

    Returns:
        ``out_TD``: per token the weighted sum of its rows' expert outputs (zeros for a token without rows).
    """
    counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    token_M, weights_M = token_N[:sum(counts)], weights_N[:sum(counts)]
    y_MD = grouped_mlp_reference(x_TD[token_M], counts, w1, w2, w3, b1, b2, activation)
    return weighted_combine_reference(y_MD, weights_M, token_M, x_TD.shape[0])


def _check(counts: Sequence[int] | Tensor, w1: Tensor, w3: Tensor | None, b1: Tensor | None, b2: Tensor | None,
           activation: str, fn: str) -> None:
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"{fn}: activation={activation!r} must be one of {FUSED_ACTIVATIONS}")
    if (w3 is None) != (activation != "swiglu"):
        raise ValueError(f"{fn}: activation={activation!r} {'needs' if w3 is None else 'takes no'} w3")
    if (b1 is None) != (b2 is None):
        raise ValueError(f"{fn}: pass both b1 and b2, or neither")
    if len(counts) != w1.shape[0]:
        raise ValueError(f"{fn}: got {len(counts)} counts for {w1.shape[0]} experts; pass one count per expert")


def grouped_mlp(x_MD: Tensor, counts: Sequence[int], w1: Tensor, w2: Tensor, w3: Tensor | None = None,
                b1: Tensor | None = None, b2: Tensor | None = None, activation: str = "gelu") -> Tensor:
    """Fast path of :func:`grouped_mlp_reference` (same arguments, same result; see the module docstring).

    The tensors must share one dtype (cast them first under autocast); the GEMMs run with autocast off.
    Double backward is not supported (the first backward frees the saved activations). Under
    ``torch.compile`` it traces the reference (the rows' counts are graph inputs there).

    Example:
        >>> w1, w2, x = torch.randn(2, 4, 8), torch.randn(2, 8, 4), torch.randn(5, 4)
        >>> torch.allclose(grouped_mlp(x, [2, 3], w1, w2), grouped_mlp_reference(x, [2, 3], w1, w2), atol=1e-5)
        True
    """
    _check(counts, w1, w3, b1, b2, activation, "grouped_mlp")
    if torch.compiler.is_compiling():
        return grouped_mlp_reference(x_MD, counts, w1, w2, w3, b1, b2, activation)
    record = _records_graph(x_MD, w1, w2, w3, b1, b2)
    return _GroupedMLP.apply(x_MD, w1, w2, w3, b1, b2, tuple(int(c) for c in counts), activation, record)


def routed_mlp(x_TD: Tensor, token_N: Tensor, weights_N: Tensor, counts: Sequence[int] | Tensor, w1: Tensor,
               w2: Tensor, w3: Tensor | None = None, b1: Tensor | None = None, b2: Tensor | None = None,
               activation: str = "gelu") -> Tensor:
    """Fast path of :func:`routed_mlp_reference`: no ``[M, D]`` buffer, expert by expert.

    Rows past ``sum(counts)`` of ``token_N``/``weights_N`` (dropped assignments) are ignored. ``counts`` may
    be a LongTensor: it is then read on the host here (the layer's one host sync; under ``torch.compile``
    inside a custom operator, so without a graph break). ``x_TD``, the expert weights and biases must share
    one dtype; the routing weights' gradient comes back in ``weights_N``'s dtype. Double backward is not
    supported.

    Example:
        >>> w1, w2, x = torch.randn(2, 4, 8), torch.randn(2, 8, 4), torch.randn(3, 4)
        >>> token, weight = torch.tensor([0, 2, 0]), torch.tensor([0.5, 1.0, 0.5])
        >>> fast = routed_mlp(x, token, weight, torch.tensor([1, 2]), w1, w2)
        >>> torch.allclose(fast, routed_mlp_reference(x, token, weight, [1, 2], w1, w2), atol=1e-5)
        True
    """
    _check(counts, w1, w3, b1, b2, activation, "routed_mlp")
    if weights_N.shape != token_N.shape:
        raise ValueError(f"routed_mlp: weights_N {tuple(weights_N.shape)} must have the shape of token_N "
                         f"{tuple(token_N.shape)}: one weight per row")
    if torch.compiler.is_compiling():
        counts_E = counts if isinstance(counts, Tensor) else torch.tensor(list(counts), device=token_N.device)
        return compiled.routed_mlp(x_TD, token_N, weights_N, counts_E, w1, w2, w3, b1, b2, activation)
    # NOTE: host sync (when counts is a tensor): the per-expert GEMMs need their sizes.
    host = tuple(counts.tolist() if isinstance(counts, Tensor) else (int(c) for c in counts))
    if sum(host) > token_N.shape[0]:
        raise ValueError(f"routed_mlp: counts sum to {sum(host)} but token_N has only {token_N.shape[0]} rows")
    record = _records_graph(x_TD, weights_N, w1, w2, w3, b1, b2)
    return _RoutedMLP.apply(x_TD, token_N, weights_N, w1, w2, w3, b1, b2, host, activation, record)


# NOTE: each expert's activations are saved on their own (as autograd saves them: through the active
# saved_tensors_hooks, so checkpointing and offloading see them), not with save_for_backward, which keeps all of
# them until the whole node has run: the backward drops each expert's as soon as it is done, so the weight
# gradients grow into the memory the activations leave, as with the reference's per-expert autograd nodes.


def _records_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call (else nothing is saved: evaluation, no_grad, inference mode)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _SavedPerExpert:
    """Each expert's (and routed group's) saved tensors, each released by the backward once it is done."""

    def __init__(self, slots: int, record: bool) -> None:
        self.saved: list[tuple | None] | None = [None] * slots if record else None

    def keep(self, e: int, acts: K.Acts) -> None:
        if self.saved is not None:
            self.saved[e] = tuple(_compat.make_saved_tensor(t) for t in acts)

    def fetch(self, e: int, rows: slice) -> K.Acts:
        if self.saved is None or self.saved[e] is None:
            raise RuntimeError("lightning_moe fused experts: backward ran twice through one forward; the first "
                               "freed the saved activations (run the forward again)")
        packed, self.saved[e] = self.saved[e], None
        return tuple(s.unpack() for s in cast(tuple, packed))  # not None: checked above

    def release(self) -> None:
        self.saved = None


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_MD: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, b1: Tensor | None,
                b2: Tensor | None, counts: tuple[int, ...], activation: str, record: bool) -> Tensor:
        ctx.store = _SavedPerExpert(len(counts), record)
        with torch.autocast(x_MD.device.type, enabled=False):
            y_MD = K.grouped_forward(x_MD, counts, w1, w2, w3, b1, b2, activation, ctx.store.keep)
        ctx.counts, ctx.activation = counts, activation
        ctx.save_for_backward(x_MD, w1, w2, w3, b1, b2)
        return y_MD

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_MD: Tensor):
        x_MD, w1, w2, w3, b1, b2 = ctx.saved_tensors
        grads = K.empty_grads((w1, w2, w3, b1, b2), ctx.needs_input_grad[1:6])
        with torch.autocast(x_MD.device.type, enabled=False):
            gx_MD = K.grouped_backward(grad_MD.contiguous(), x_MD, ctx.counts, (w1, w2, w3),
                                       (*grads, ctx.needs_input_grad[0]), ctx.activation, ctx.store.fetch)
        ctx.store.release()
        return (gx_MD, *grads, None, None, None)


class _RoutedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, token_N: Tensor, weights_N: Tensor, w1: Tensor, w2: Tensor,
                w3: Tensor | None, b1: Tensor | None, b2: Tensor | None, counts: tuple[int, ...],
                activation: str, record: bool) -> Tensor:
        ctx.store = _SavedPerExpert(len(counts) + len(K.expert_chunks(counts, x_TD.shape[-1])), record)
        w_N = weights_N.to(x_TD.dtype)
        with torch.autocast(x_TD.device.type, enabled=False):
            out_TD = K.routed_forward(x_TD, token_N, w_N, counts, w1, w2, w3, b1, b2, activation, ctx.store.keep)
        ctx.counts, ctx.activation, ctx.weights_dtype = counts, activation, weights_N.dtype
        ctx.save_for_backward(x_TD, token_N, w_N, w1, w2, w3, b1, b2)
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_TD: Tensor):
        x_TD, token_N, w_N, w1, w2, w3, b1, b2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = K.empty_grads((w1, w2, w3, b1, b2), needs[3:8])
        with torch.autocast(x_TD.device.type, enabled=False):
            gx_TD, gw_N = K.routed_backward(grad_TD.contiguous(), x_TD, token_N, w_N, ctx.counts, (w1, w2, w3),
                                            (*grads, needs[0]), needs[2], ctx.activation, ctx.store.fetch)
        ctx.store.release()
        return (gx_TD, None, None if gw_N is None else gw_N.to(ctx.weights_dtype), *grads, None, None, None)
