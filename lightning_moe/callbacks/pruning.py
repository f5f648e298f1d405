"""Pruning callbacks: drop whole experts that routing rarely uses, or prune weights inside experts.

* :class:`ExpertPruning` removes the least-used experts of every layer (router rows and expert
  weights), from token counts accumulated during training, and keeps training.
* :class:`ExpertMagnitudePruning` is Lightning's :class:`~lightning.pytorch.callbacks.ModelPruning`
  restricted to expert weights, with a per-expert hidden-neuron (structured) mode.

Shape legend: E experts (global), D model width, H expert hidden width, J kept experts, Y MoE layers.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import prune as torch_prune

from lightning_moe.nn.experts import GroupedExperts, TemplateExperts
from lightning_moe.nn.moe import find_moe_layers
from lightning_moe.prune import (
    Remap,
    choose_experts,
    hidden_unit_mask,
    prune_experts,
    remap_optimizers,
    remove_experts,
)

# The surgery lives in lightning_moe.prune; re-exported for code that imports it from here.
__all__ = ["ExpertMagnitudePruning", "ExpertPruning", "choose_experts", "hidden_unit_mask", "remove_experts"]


def _expert_parallel_size(trainer: pl.Trainer) -> int:
    return int(getattr(trainer.strategy, "expert_parallel_size", 1) or 1)


def _check(owner: object, *checks: tuple[bool, str]) -> None:
    """Argument checks in one place: ``ValueError("<Owner>: <message>")`` for the first that fails."""
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{type(owner).__name__}: {message}")


class ExpertPruning(Callback):
    """Remove the least-used experts of every MoE layer once, at the end of epoch ``at_epoch``.

    During training the callback sums each layer's ``tokens_per_expert`` after every training
    batch (device tensors, no sync). At the end of epoch ``at_epoch`` the counts are summed over
    ranks (one all-reduce) and every layer keeps its ``keep`` most used experts and those with at
    least ``min_share`` of the assignments (both criteria apply when both are given). Router rows,
    ``expert_bias`` entries and expert weights of the others are removed and ``num_experts``
    updated; optimizers are pointed at the new parameters in place, keeping the state
    (momentum, Adam moments) of the kept experts and leaving learning-rate schedulers untouched, so
    training simply continues. Under DDP the model is re-wrapped (parameter shapes changed).

    A layer never keeps fewer than ``top_k`` experts, and under ``strategy="moe"`` every count is
    raised to a multiple of ``trainer.strategy.expert_parallel_size``. A layer sharded by
    expert parallelism (``GroupedExperts`` experts) is gathered over its expert group with its
    optimizer state, pruned as a whole and sharded again (a collective over the group; template
    experts under expert parallelism are refused with a clear error).

    Counts are those of the last forward of each layer in each training batch; ``counts`` holds
    the window, ``kept`` the kept global ids of each layer after pruning.

    Args:
        keep: experts to keep per layer (int >= 1) or fraction of the layer's experts (float in (0, 1]).
        min_share: drop experts below this share of the layer's assignments (in [0, 1)).
        at_epoch: epoch (0-based) at whose end to prune.

    Raises:
        ValueError: for bad arguments (neither ``keep`` nor ``min_share``, out of range).

    Example:
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[ExpertPruning(keep=0.5, at_epoch=0)])  # doctest: +SKIP
    """

    def __init__(self, keep: int | float | None = None, min_share: float | None = None, at_epoch: int = 0) -> None:
        # Every condition is evaluated before _check runs: type guards keep them from raising TypeError.
        is_count = isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1
        share_ok = min_share is None or (isinstance(min_share, (int, float)) and 0 <= min_share < 1)
        _check(self, (keep is not None or min_share is not None,
                      "give keep=<experts or fraction> and/or min_share=<share>; both are None"),
               (keep is None or is_count or (isinstance(keep, float) and 0 < keep <= 1),
                f"keep={keep!r} must be an int >= 1 or a float in (0, 1]"),
               (share_ok, f"min_share={min_share!r} must be in [0, 1), e.g. 0.02"),
               (isinstance(at_epoch, int) and at_epoch >= 0, f"at_epoch={at_epoch!r} must be an int >= 0"))
        self.keep = keep
        self.min_share = min_share
        self.at_epoch = at_epoch
        self.counts: dict[str, Tensor] = {}
        self.kept: dict[str, list[int]] = {}
        self._last_seen: dict[str, int] = {}  # layer path -> its forward_count when last counted
        self._done = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._done:
            return
        for name, layer in find_moe_layers(pl_module):
            if layer.forward_count == self._last_seen.get(name, 0):  # the layer did not run in this batch
                continue
            self._last_seen[name] = layer.forward_count
            counts = layer.tokens_per_expert.detach()
            if name not in self.counts or self.counts[name].shape != counts.shape:
                self.counts[name] = torch.zeros_like(counts)
            self.counts[name] += counts

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._done and trainer.current_epoch == self.at_epoch:
            self.prune(trainer, pl_module)

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[int]]:
        """Prune every layer now from the counts so far (all ranks must call it); returns the kept ids."""
        layers = find_moe_layers(pl_module)
        ep = _expert_parallel_size(trainer)
        for name, layer in layers:  # refuse before changing anything
            sharded = layer.experts.num_experts != layer.num_experts
            if sharded and not isinstance(layer.experts, GroupedExperts):
                raise ValueError(
                    f"{type(self).__name__}: layer {name!r} holds {layer.experts.num_experts} of its "
                    f"{layer.num_experts} {type(layer.experts).__name__} experts (expert_parallel_size={ep}); "
                    "pruning sharded layers needs GroupedExperts: prune with expert_parallel_size=1 instead"
                )
        if not layers:
            return {}
        counts_YE = [self.counts.get(name, torch.zeros_like(layer.tokens_per_expert)) for name, layer in layers]
        flat = torch.cat([c.to(layers[0][1].tokens_per_expert.device) for c in counts_YE]).double()
        flat = trainer.strategy.reduce(flat, reduce_op="sum")  # every rank prunes the same experts
        remap: Remap = {}
        offset = 0
        for name, layer in layers:
            counts_E = flat[offset:offset + layer.num_experts]
            offset += layer.num_experts
            keep_J, notes = choose_experts(counts_E, self.keep, self.min_share, layer.top_k, ep)
            for note in notes:
                rank_zero_warn(f"{type(self).__name__}: layer {name!r}: {note}")
            before = layer.num_experts
            remap.update(prune_experts(layer, name, keep_J, trainer.optimizers))
            self.kept[name] = keep_J.tolist()
            share = counts_E[keep_J.to(counts_E.device)].sum() / counts_E.sum().clamp_min(1)
            rank_zero_info(f"{type(self).__name__}: layer {name!r}: {before} -> {layer.num_experts} experts, "
                           f"kept {float(share):.1%} of the routed assignments")
        if remap:
            remap_optimizers(trainer.optimizers, remap)
            self._rewrap_ddp(trainer)
        self.counts.clear()
        self._last_seen.clear()
        self._done = True
        return dict(self.kept)

    @staticmethod
    def _rewrap_ddp(trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel) and hasattr(strategy, "configure_ddp"):
            # DDP's reducer holds the old parameters and bucket sizes: build it again.
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()

    def state_dict(self) -> dict[str, Any]:
        return {"done": self._done, "kept": self.kept, "counts": {k: v.cpu() for k, v in self.counts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = state_dict.get("done", False)
        self.kept = dict(state_dict.get("kept", {}))
        self.counts = dict(state_dict.get("counts", {}))


# ------------------------------------------------------------------------------------------------
# Magnitude pruning of expert weights
# ------------------------------------------------------------------------------------------------


class ExpertMagnitudePruning(ModelPruning):
    """Lightning's ``ModelPruning`` on expert weights only: L1 unstructured or per-expert hidden neurons.

    Parameters to prune are the stacked expert weights (``w1``, ``w2``, ``w3``) of every MoE layer
    (``nn.Linear`` weights inside template experts), passed through ``filter_parameters_to_prune``
    (override it to narrow them further); routers, shared experts (unless ``include_shared``) and
    dense layers are never pruned. The schedule is ``ModelPruning``'s: ``amount`` and
    ``apply_pruning`` may be callables of the epoch; pruning runs at train epoch end.

    * ``structured=False``: ``l1_unstructured``; global over all expert weights of the model
      (``use_global_unstructured=True``, default) or per stacked weight.
    * ``structured=True``: per expert, the hidden units with the smallest L1 weight
      (``|w1[:, h]| + |w3[:, h]| + |w2[h, :]|``) are pruned: columns of ``w1``/``w3`` and the matching
      rows of ``w2``, through ``torch.nn.utils.prune.custom_from_mask`` (torch's ``ln_structured``
      on the stacked ``[E, D, H]`` tensor would prune unit ``h`` in all experts at once).

    Two differences from ``ModelPruning``, for expert parallelism:

    1. ``ModelPruning.setup`` binds the parameters before ``strategy.setup``, which shards the
       experts (new, smaller parameters): this callback binds them in ``on_fit_start``, after.
    2. With ``make_pruning_permanent`` (default), ``ModelPruning.on_save_checkpoint`` replaces the
       checkpoint's state dict with this rank's ``pl_module.state_dict()``, dropping what the
       strategy put there (the gathered full logical model under ``strategy="moe"``). This callback
       folds ``*_orig * *_mask`` into the checkpoint's own state dict instead and leaves every
       other entry as the strategy wrote it.

    Under expert parallelism the global L1 threshold is per rank (over its local experts).

    Args:
        amount: fraction (float) or number (int) to prune per pruning event, or a callable of the epoch.
        structured: prune hidden neurons per expert instead of single weights.
        use_global_unstructured: unstructured only: one threshold over all expert weights.
        apply_pruning: bool or callable of the epoch (when to prune).
        make_pruning_permanent: fold masks into checkpoints and remove them at the end of training.
        include_shared: prune shared experts too.
        verbose: 0, 1 or 2 (``ModelPruning``'s sparsity logging).

    Example:
        >>> trainer = pl.Trainer(callbacks=[ExpertMagnitudePruning(amount=0.3, structured=True)])  # doctest: +SKIP
    """

    def __init__(self, amount: int | float | Any = 0.5, structured: bool = False, use_global_unstructured: bool = True,
                 apply_pruning: bool | Any = True, make_pruning_permanent: bool = True, include_shared: bool = False,
                 verbose: int = 0) -> None:
        _check(self, (not isinstance(amount, float) or 0 <= amount <= 1,
                      f"amount={amount!r} must be a fraction in [0, 1], an int count or a callable of the epoch"))
        super().__init__(
            pruning_fn="l1_unstructured",
            use_global_unstructured=use_global_unstructured and not structured,
            amount=amount,
            apply_pruning=apply_pruning,
            make_pruning_permanent=make_pruning_permanent,
            use_lottery_ticket_hypothesis=False,
            verbose=verbose,
        )
        self.structured = structured
        self.include_shared = include_shared

    def expert_parameters(self, pl_module: nn.Module) -> list[tuple[nn.Module, str]]:
        """``(module, name)`` of every expert weight in ``pl_module`` (see the class docstring)."""
        found: list[tuple[nn.Module, str]] = []
        for name, layer in find_moe_layers(pl_module):
            banks = [layer.experts] + ([layer.shared_experts] if self.include_shared and layer.shared_experts else [])
            for bank in banks:
                if isinstance(bank, GroupedExperts):
                    found += [(bank, w) for w in ("w1", "w2", "w3") if getattr(bank, w) is not None]
                elif isinstance(bank, TemplateExperts) and not self.structured:
                    found += [(m, "weight") for m in bank.modules() if isinstance(m, nn.Linear)]
                else:
                    raise ValueError(f"{type(self).__name__}: layer {name!r} has {type(bank).__name__} experts; "
                                     "structured=True supports GroupedExperts only (use structured=False)")
        return found

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Deliberately empty: strategy.setup (after this hook) may shard the experts into new
        # parameters; on_fit_start binds the parameters the training will really update.
        self._parameters_to_prune = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._make_pruning_permanent and _expert_parallel_size(trainer) > 1:
            raise ValueError(f"{type(self).__name__}: make_pruning_permanent=False with expert_parallel_size>1: the "
                             "strategy gathers expert weights by name at the end of fit; keep it True")
        self._parameters_to_prune = self.filter_parameters_to_prune(self.expert_parameters(pl_module))

    def _apply_local_pruning(self, amount: float) -> None:
        if not self.structured:
            return super()._apply_local_pruning(amount)
        banks = {id(m): m for m, _ in self._parameters_to_prune if isinstance(m, GroupedExperts)}
        for bank in banks.values():
            mask_EH = hidden_unit_mask(bank, amount)
            masks = {"w1": mask_EH[:, None, :], "w3": mask_EH[:, None, :], "w2": mask_EH[:, :, None]}
            for name in ("w1", "w2", "w3"):
                if getattr(bank, name) is None:
                    continue
                full = masks[name].expand_as(getattr(bank, name)).contiguous()
                existing = getattr(bank, f"{name}_mask", None)
                if existing is None:
                    torch_prune.custom_from_mask(bank, name, full)
                else:  # the pruning hook recomputes w = w_orig * mask before every forward
                    existing.mul_(full.to(existing.dtype))
                    setattr(bank, name, getattr(bank, f"{name}_orig") * existing)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not self._make_pruning_permanent or "state_dict" not in checkpoint:
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.endswith("_mask")]:
            base = key[: -len("_mask")]
            if base + "_orig" not in state:
                continue
            orig, mask = state.pop(base + "_orig"), state.pop(key)
            state[base] = orig * mask.to(device=orig.device, dtype=orig.dtype)
