"""``MoELightningModule``: change the base class, keep the training loop.

A ``LightningModule`` whose ``training_step`` returns the task loss trains its :class:`~lightning_moe.MoE`
layers correctly without touching that step: the routing losses are added, aux-loss-free
balancing is updated after every optimizer step, and routing statistics are logged.

How it hooks in (and why there):

1. **Routing losses.** ``__init_subclass__`` wraps the ``training_step`` a subclass defines
   (``functools.wraps``, so Lightning's override checks see the user's function). The wrapper runs
   the step, then adds the summed ``aux_loss`` of the layers that ran in it to the returned loss (a
   tensor, or ``"loss"`` of a dict; ``None`` stays ``None``). The wrapper is the module's own
   method, so it runs however the strategy calls ``training_step``: directly, or redirected through
   the DDP wrapper's ``forward`` (Lightning looks the method up on the module), and the aux loss is
   in the graph DDP inspects. Lightning divides the returned loss by ``accumulate_grad_batches``
   after the step returns, so the aux loss is scaled like the task loss. A ``super().training_step``
   chain adds it once (only the outermost call does). Under manual optimization nothing is added:
   call :meth:`MoELightningModule.moe_aux_loss` for your own ``manual_backward``.
2. **Aux-loss-free balancing.** Each training_step adds the token counts of the layers with
   ``bias_update_rate > 0`` to a step accumulator (local, no collective). A step post-hook on the
   trainer's optimizers (``Optimizer.register_step_post_hook``) sums it over processes in ONE
   all-reduce for all layers and calls ``layer.update_expert_bias``. The counts come from the same
   place as the balancing loss's: a layer whose loss scope already summed its counts over every rank
   (``reduced_over == world_size``, see :mod:`lightning_moe.nn.reduce`) gives its
   ``global_tokens_per_expert``, which the hook does not sum again (no all-reduce at all when every
   balanced layer did); otherwise its ``tokens_per_expert``, summed by the hook. A hook on the optimizer
   rather than on the LightningModule: it fires exactly when the parameters changed (after the last
   micro-batch under gradient accumulation; inside ``training_step`` under manual optimization),
   before callbacks' ``on_train_batch_end`` (a checkpoint saved there holds the updated bias), and
   user overrides of the module's hooks cannot switch it off. Accumulators are plain tensors on the
   module object, not buffers, so DDP's buffer broadcast leaves them alone; ``expert_bias`` itself
   is a buffer that every rank updates identically from the summed counts.
3. **Logging.** Each training step logs ``moe/aux_loss``, ``moe/z_loss``, ``moe/dropped_fraction``,
   ``moe/load_imbalance`` (busiest expert / mean, worst layer) and ``moe/routing_entropy`` (mean over
   layers) for this rank, without a collective; the same names with ``_epoch`` hold the epoch mean,
   synced over ranks once at epoch end. ``log_per_layer=True`` adds step values ``moe/layer_{i}/<stat>``.

"Ran in this step" is tracked by each layer's ``forward_count``, so a layer skipped in a step
contributes nothing (its old loss graph, already freed by backward, is never reused). With several
forwards of a layer in one step, the last one counts.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_moe.metrics import load_imbalance
from lightning_moe.nn.moe import MoE, find_moe_layers
from lightning_moe.nn.recompute import aux_loss_term

_WRAPPED = "_lightning_moe_wrapped"
_OWNER = "_lightning_moe_owner"  # set on optimizers: weakref to the module whose post-hook they carry
_STATS = ("aux_loss", "z_loss", "dropped_fraction", "load_imbalance", "routing_entropy")


class MoELightningModule(LightningModule):
    """A ``LightningModule`` that trains the :class:`~lightning_moe.MoE` layers it contains.

    Subclass it instead of ``LightningModule`` and write ``training_step`` as usual, returning the
    task loss: the layers' routing losses are added to it, ``expert_bias`` is updated after every
    optimizer step for layers with ``bias_update_rate > 0``, and routing statistics are logged.
    Layers are found by type anywhere in the module tree on every step, so layers created in
    ``configure_model`` or by :func:`lightning_moe.upcycle` later are found too.

    Args:
        log_per_layer: also log ``moe/layer_{i}/<stat>`` for every layer; default the class
            attribute ``log_per_layer`` (False).
        args: forwarded to :class:`~lightning.pytorch.LightningModule`.
        kwargs: forwarded to :class:`~lightning.pytorch.LightningModule`.

    Example:
        >>> import torch
        >>> import lightning_moe as lmoe
        >>> class Model(lmoe.MoELightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.moe = lmoe.MoE(dim=8, num_experts=4, top_k=2)
        ...     def training_step(self, batch, batch_idx):
        ...         return self.moe(batch).pow(2).mean()  # the task loss only
        >>> model = Model()
        >>> [name for name, _ in model.moe_layers()]
        ['moe']
        >>> x = torch.randn(4, 8)
        >>> loss = model.training_step(x, 0)  # task loss + routing losses
        >>> torch.allclose(loss, model.moe(x).pow(2).mean() + model.moe.aux_loss)
        True
    """

    log_per_layer: bool = False
    # Class-level defaults keep the wrapper working if a subclass skips this __init__.
    _moe_depth = 0
    _moe_step_layers: list[tuple[str, MoE]] = []
    _moe_before: list[int] = []
    _moe_seen: list[int] = []
    _moe_counts: Tensor | None = None
    _moe_count_layers: list[MoE] = []
    _moe_count_reduced: list[bool | None] = []

    def __init__(self, *args: Any, log_per_layer: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if log_per_layer is not None:
            self.log_per_layer = bool(log_per_layer)
        self._moe_depth = 0  # > 0 while a wrapped training_step runs
        self._moe_step_layers: list[tuple[str, MoE]] = []  # the layers of the running/last training step
        self._moe_before: list[int] = []  # each layer's forward_count when the step began
        self._moe_seen: list[int] = []  # ... when its counts were last added to the accumulator
        self._moe_counts: Tensor | None = None  # tokens per expert of balanced layers since the last step
        self._moe_count_layers: list[MoE] = []  # the layers _moe_counts holds, concatenated in this order
        self._moe_count_reduced: list[bool | None] = []  # per layer: counts already summed over every rank

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = getattr(cls, "training_step", None)
        # Also wraps a training_step inherited from a mixin that is not an MoELightningModule.
        if inspect.isfunction(step) and step is not LightningModule.training_step and not getattr(step, _WRAPPED, 0):
            # A method replaced on the class on purpose: setattr, as mypy rejects assigning to a method.
            setattr(cls, "training_step", _wrap_training_step(step))  # noqa: B010

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """Every :class:`~lightning_moe.MoE` layer in the module tree, with its module path.

        Searched on every call, so layers added after ``__init__`` are found. Sets each layer's
        ``layer_name`` to its path (used in its error messages).

        Returns:
            ``[(name, layer), ...]`` in ``named_modules()`` order; ``i`` in ``moe/layer_{i}`` is
            the index in this list.
        """
        layers = find_moe_layers(self)
        for name, layer in layers:
            layer.layer_name = name
        return layers

    def moe_aux_loss(self) -> Tensor:
        """Sum of the layers' ``aux_loss`` (balancing + z-loss, with graph) of their last forward.

        Inside ``training_step`` only layers that ran in this step count. Use it under manual
        optimization: ``self.manual_backward(task_loss + self.moe_aux_loss())``.

        Returns:
            A scalar tensor; zero when no layer ran.
        """
        if self._moe_depth:
            layers = self._moe_ran_layers()
        else:
            layers = [layer for _, layer in self.moe_layers() if layer.forward_count]
        if not layers:
            return torch.zeros((), device=self.device)
        return _aux_sum(layers)

    # -- the training_step wrapper --------------------------------------------------------------

    def _moe_begin_step(self) -> None:
        self._moe_step_layers = self.moe_layers()
        self._moe_before = [layer.forward_count for _, layer in self._moe_step_layers]
        self._moe_seen = list(self._moe_before)
        if self._trainer is not None and any(layer.bias_update_rate > 0 for _, layer in self._moe_step_layers):
            self._moe_hook_optimizers()

    def _moe_end_step(self, output: Any) -> Any:
        self._moe_accumulate_counts()
        ran = self._moe_ran_layers()
        if not ran:
            return output
        if self._trainer is not None:
            self._moe_log(ran)
        if not self.automatic_optimization or output is None:
            return output
        aux = _aux_sum(ran)
        if isinstance(output, Tensor):
            return output + aux
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + aux}
        return output  # Lightning reports a return without "loss" itself

    def _moe_ran_layers(self) -> list[MoE]:
        return [layer for (_, layer), before in zip(self._moe_step_layers, self._moe_before, strict=True)
                if layer.forward_count != before]

    # -- aux-loss-free balancing ----------------------------------------------------------------

    def _moe_accumulate_counts(self) -> None:
        """Add the counts of balanced layers that ran since they were last added (local, no collective)."""
        balanced = [(i, layer) for i, (_, layer) in enumerate(self._moe_step_layers) if layer.bias_update_rate > 0]
        new = [layer.forward_count != self._moe_seen[i] for i, layer in balanced]
        if not any(new):
            return
        for i, layer in balanced:
            self._moe_seen[i] = layer.forward_count
        parts = [self._moe_balance_counts(layer) if is_new else (torch.zeros_like(layer.tokens_per_expert), None)
                 for (_, layer), is_new in zip(balanced, new, strict=True)]
        counts = torch.cat([part for part, _ in parts])
        reduced = [flag for _, flag in parts]
        layers = [layer for _, layer in balanced]
        same = len(layers) == len(self._moe_count_layers) and all(
            a is b for a, b in zip(layers, self._moe_count_layers, strict=True))
        if same and self._moe_counts is not None:
            old = self._moe_count_reduced
            same = all(a is None or b is None or a == b for a, b in zip(old, reduced, strict=True))
            reduced = [b if a is None else a for a, b in zip(old, reduced, strict=True)]
        if self._moe_counts is None or not same:
            # The layer set changed (upcycling mid-run), or a layer switched between summed and own counts:
            # counts of the old set no longer apply.
            self._moe_counts, self._moe_count_layers = counts, layers
        else:
            self._moe_counts += counts
        self._moe_count_reduced = reduced

    def _moe_balance_counts(self, layer: MoE) -> tuple[Tensor, bool]:
        """The counts of ``layer``'s last forward for bias balancing, and whether they are summed over every rank.

        The balancing loss's counts, where its scope summed them over the whole world (no second
        all-reduce); this rank's own otherwise (summed by :meth:`_moe_update_expert_bias`).
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and layer.reduced_over == world:
            return layer.global_tokens_per_expert, True
        return layer.tokens_per_expert, False

    def _moe_hook_optimizers(self) -> None:
        for optimizer in self.trainer.optimizers:
            owner = getattr(optimizer, _OWNER, None)
            if owner is not None and owner() is self:
                continue
            optimizer.register_step_post_hook(_post_step_hook(weakref.ref(self)))
            setattr(optimizer, _OWNER, weakref.ref(self))

    @torch.no_grad()
    def _moe_update_expert_bias(self) -> None:
        """After an optimizer step: sum the step's counts over ranks (one all-reduce), update biases."""
        if self._moe_depth:
            self._moe_accumulate_counts()  # manual optimization: the step runs inside training_step
        counts = self._moe_counts
        if counts is None:
            return
        self._moe_counts = None
        sizes = [layer.num_experts for layer in self._moe_count_layers]
        # Every rank processes different tokens (data x expert parallel): sum over the world the counts that
        # are this rank's own. Every rank holds the same flags (the same layers ran the same scopes).
        todo = [i for i, reduced in enumerate(self._moe_count_reduced) if not reduced]
        if (todo and self._trainer is not None and self.trainer.world_size > 1 and dist.is_available()
                and dist.is_initialized()):
            if len(todo) == len(sizes):
                dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            else:
                parts = list(counts.split(sizes))
                own = torch.cat([parts[i] for i in todo])
                dist.all_reduce(own, op=dist.ReduceOp.SUM)
                for i, part in zip(todo, own.split([sizes[i] for i in todo]), strict=True):
                    parts[i] = part
                counts = torch.cat(parts)
        for layer, load in zip(self._moe_count_layers, counts.split(sizes), strict=True):
            layer.update_expert_bias(load)

    # -- logging ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _moe_log(self, ran: list[MoE]) -> None:
        """Log the routing stats of the layers that ran: a few stacked tensor ops, no host sync."""
        aux_Y = torch.stack([layer.aux_loss.detach().float() for layer in ran])
        z_Y = torch.stack([layer.z_loss.detach().float() for layer in ran])
        dropped_Y = torch.stack([layer.dropped_tokens for layer in ran]).float()
        assignments_Y = torch.stack([layer.assignments for layer in ran]).float()
        entropy_Y = torch.stack([layer.router_entropy.float() for layer in ran])
        if len({layer.num_experts for layer in ran}) == 1:
            imbalance_Y = load_imbalance(torch.stack([layer.tokens_per_expert for layer in ran]).float())
        else:
            imbalance_Y = torch.stack([load_imbalance(layer.tokens_per_expert.float()) for layer in ran])
        totals = {
            "aux_loss": aux_Y.sum(),
            "z_loss": z_Y.sum(),
            "dropped_fraction": dropped_Y.sum() / assignments_Y.sum().clamp_min(1),
            "load_imbalance": imbalance_Y.max(),
            "routing_entropy": entropy_Y.mean(),
        }
        for stat, value in totals.items():
            self._moe_log_value(f"moe/{stat}", value)
        if not self.log_per_layer:
            return
        per_layer = {"aux_loss": aux_Y, "z_loss": z_Y, "dropped_fraction": dropped_Y / assignments_Y.clamp_min(1),
                     "load_imbalance": imbalance_Y, "routing_entropy": entropy_Y}
        index = {id(layer): i for i, (_, layer) in enumerate(self._moe_step_layers)}
        # NOTE: each self.log call costs ~0.2-0.5 ms of Python: per-layer values are step values only.
        for j, layer in enumerate(ran):
            for stat in _STATS:
                self._moe_log_value(f"moe/layer_{index[id(layer)]}/{stat}", per_layer[stat][j], epoch=False)

    def _moe_log_value(self, name: str, value: Tensor, epoch: bool = True) -> None:
        # Step values are this rank's: sync_dist on a step value would all-reduce (after a barrier) every
        # step and key. The epoch mean goes under its own name, synced once at epoch end.
        self.log(name, value, on_step=True, on_epoch=False, batch_size=1)
        if epoch:
            self.log(f"{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)


def _aux_sum(layers: list[MoE]) -> Tensor:
    # Through recompute.aux_loss_term: a layer under a reentrant activation checkpoint gets its gradient.
    terms = [aux_loss_term(layer, layer.aux_loss) for layer in layers]
    return sum(terms[1:], terms[0])


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: MoELightningModule, *args: Any, **kwargs: Any) -> Any:
        if self._moe_depth:  # super().training_step(...) from an override: the outermost call adds
            return step(self, *args, **kwargs)
        self._moe_begin_step()
        self._moe_depth = 1
        try:
            output = step(self, *args, **kwargs)
            return self._moe_end_step(output)
        finally:
            self._moe_depth = 0

    setattr(training_step, _WRAPPED, 1)
    return training_step


def _post_step_hook(module_ref: weakref.ref) -> Callable[..., None]:
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        module = module_ref()
        if module is not None:
            module._moe_update_expert_bias()

    return hook


__all__ = ["MoELightningModule"]
