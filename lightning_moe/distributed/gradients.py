"""Expert gradients under expert parallelism: reduction, global-norm clipping, non-finite agreement.

After backward, a rank's expert gradient is the sum over the ranks of its expert group (the
all-to-all's backward brings every token's contribution home), while DDP averages dense gradients
over all ranks. :func:`reduce_expert_gradients` makes the two agree; :func:`clip_grad_norm` clips
by the norm of the whole logical model (every expert once); :func:`agree_on_nonfinite` makes a
``GradScaler`` on every rank skip the step when any rank's expert gradients are non-finite. The
strategy owns the groups and calls these after the last backward of an optimizer step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_moe import _compat

BUCKET_NUMEL = 1 << 24  # expert gradients are all-reduced in flat buckets of at most 16M elements


def reduce_expert_gradients(params: Sequence[Tensor], data_group: dist.ProcessGroup, world_size: int,
                            device: torch.device) -> None:
    """Turn each rank's expert gradients into those of single-process training on the global batch.

    Sums over the ranks holding the same experts (``data_group``) and divides by the world size,
    giving ``d(mean of the per-rank losses)/dW``, as DDP gives for dense parameters. A collective
    over ``data_group``: every rank passes its expert parameters in the same order.

    Args:
        params: this rank's trainable expert parameters.
        data_group: the ranks holding the same experts.
        world_size: ranks in the job (the divisor of DDP's mean).
        device: where the presence flags travel (the rank's device: CUDA for NCCL).
    """
    reduce = dist.get_world_size(data_group) > 1
    # An expert no token reached anywhere keeps grad None, as in single-process training (the
    # optimizer then skips it); every rank must still send the same buckets.
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in buckets([g for p in params if (g := p.grad) is not None]):  # every p now has one
        flat = _compat.flatten_dense_tensors(bucket)
        if reduce:
            dist.all_reduce(flat, group=data_group)
        flat.div_(world_size)
        for grad, value in zip(bucket, _compat.unflatten_dense_tensors(flat, bucket), strict=True):
            grad.copy_(value)
    if reduce:
        dist.all_reduce(has_grad, group=data_group)
    for p, flag in zip(params, has_grad.tolist(), strict=True):
        if not flag:
            p.grad = None


def clip_grad_norm(params: Iterable[Tensor], expert_params: Iterable[Tensor], clip_val: float,
                   expert_group: dist.ProcessGroup, device: torch.device) -> None:
    """``clip_grad_norm_`` over the logical model: the 2-norm of every gradient, experts of all ranks included.

    Dense gradients are identical on every rank after DDP; expert gradients are summed over the
    expert group, which holds each expert exactly once. Every rank takes part in the all-reduce,
    whatever it holds.

    Args:
        params: the parameters an optimizer steps (those without a gradient are skipped).
        expert_params: which of them are expert parameters (held by one rank of the expert group).
        clip_val: the maximum norm.
        expert_group: the ranks over which each expert is held once.
        device: where the norm travels (the rank's device: CUDA for NCCL).
    """
    grads = [(id(p), g) for p in params if (g := p.grad) is not None]
    experts = {id(p) for p in expert_params}

    def sq_norm(grads: list[Tensor]) -> Tensor:
        if not grads:
            return torch.zeros((), device=device)
        return torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]).square().sum()

    expert_sq = sq_norm([g for i, g in grads if i in experts]).reshape(1)
    dist.all_reduce(expert_sq, group=expert_group)
    total = (sq_norm([g for i, g in grads if i not in experts]) + expert_sq[0]).sqrt()
    coef = (clip_val / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for _, g in grads:
        g.detach().mul_(coef.to(g.dtype))


def agree_on_nonfinite(params: Sequence[Tensor], device: torch.device, fallback: Iterable[Tensor] = ()) -> None:
    """Make every rank's gradients non-finite when any rank's ``params`` gradients are (a collective over the world).

    A ``GradScaler`` skips the step when it sees inf/NaN; expert gradients differ between expert
    groups, so without this only some ranks would skip.

    Args:
        params: this rank's expert parameters with a gradient.
        device: where the flag travels (the rank's device: CUDA for NCCL).
        fallback: other parameters; the first with a gradient is poisoned when ``params`` is empty.
    """
    flag = torch.zeros(1, device=device)
    for g in (p.grad for p in params):
        if g is not None:
            flag = torch.maximum(flag, (~torch.isfinite(g)).any().float())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        target = params[0] if params else next((p for p in fallback if p.grad is not None), None)
        if target is not None and target.grad is not None:
            target.grad.fill_(float("nan"))


class PendingReduction:
    """Expert parameters whose gradients changed since their last reduction (manual optimization).

    Reducing after every ``manual_backward`` would rescale the contributions of earlier backward calls
    of the same step again (the reduction divides by the world size). The strategy marks parameters
    after each backward and :meth:`take` hands those of one optimizer over right before it clips or
    steps, so each optimizer step reduces exactly once. Every rank marks and takes in the same order.
    """

    def __init__(self) -> None:
        self._pending: dict[int, Tensor] = {}  # id -> parameter, in marking order

    def mark(self, params: Iterable[Tensor]) -> None:
        """Remember ``params`` as holding unreduced gradient contributions."""
        for p in params:
            self._pending[id(p)] = p

    def take(self, params: Iterable[Tensor]) -> list[Tensor]:
        """Those of ``params`` (in their order) still to reduce; they are no longer pending afterwards."""
        return [p for p in params if self._pending.pop(id(p), None) is not None]

    def clear(self) -> None:
        self._pending.clear()


class HandClipWatch:
    """Calls ``on_call(parameters)`` before every ``torch.nn.utils.clip_grad_norm_`` while installed.

    Under expert parallelism a hand call sees only this rank's experts: each rank computes another
    norm, scales its dense gradients by another factor, and the dense replicas drift apart. The
    strategy installs this while it is set up, to reduce pending expert gradients first and to
    warn. Catches calls made through the module attribute (``torch.nn.utils.clip_grad_norm_(...)``,
    Lightning's own clipping included), not a reference imported before the strategy was set up.
    """

    _MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
    _NAME = "clip_grad_norm_"

    def __init__(self, on_call: Callable[[list[Tensor]], None]) -> None:
        self._on_call = on_call
        self._original: Callable[..., Tensor] | None = None

    def install(self) -> None:
        if self._original is not None:
            return
        original = self._original = getattr(torch.nn.utils, self._NAME)

        @functools.wraps(original)
        def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], *args: Any, **kwargs: Any) -> Tensor:
            params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
            self._on_call(params)
            return original(params, *args, **kwargs)

        for module in self._MODULES:
            setattr(module, self._NAME, clip_grad_norm_)

    def uninstall(self) -> None:
        if self._original is None:
            return
        for module in self._MODULES:
            setattr(module, self._NAME, self._original)
        self._original = None


def buckets(tensors: list[Tensor], bucket_numel: int = BUCKET_NUMEL) -> list[list[Tensor]]:
    """Consecutive same-dtype groups of at most ``bucket_numel`` elements (one oversize tensor alone)."""
    out: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        if not out or out[-1][0].dtype != t.dtype or size + t.numel() > bucket_numel:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out
