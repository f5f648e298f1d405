"""Precision callbacks: float32 routers under any Lightning precision, and skipping non-finite steps.

:class:`RouterPrecision` keeps routers in float32 when a "true" precision (``bf16-true``,
``16-true``) casts every weight; :class:`NonFiniteGuard` skips optimizer steps whose loss or
gradients are not finite and stops, with the last good weights in place, when they keep coming.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_moe.nn.moe import find_moe_layers


def _routers(module: nn.Module) -> list[nn.Module]:
    return [layer.router for _, layer in find_moe_layers(module)]


class RouterPrecision(Callback):
    """Keep router weights (and the ``expert_bias`` buffer) in ``dtype`` under any Lightning precision.

    The routers already compute in float32 (``MoE`` upcasts input and weight), but a "true"
    precision (``Trainer(precision="bf16-true" | "16-true")``) casts *stored* weights too: a
    bfloat16 gate carries 8 bits of mantissa, so near-tie routing decisions flip and small
    updates round away. Expert weights take the low precision (half the memory); routers, a
    sliver of the parameters, stay float32 and keep their float32 updates.

    How: Lightning converts the module inside ``strategy.setup`` (after the ``setup`` hooks, before
    the optimizers are created). In ``setup`` this callback wraps the precision plugin's
    ``convert_module``: it keeps a copy of every router's tensors, lets the plugin cast the model,
    then puts the routers back in ``dtype`` with their exact values (a checkpoint restored before
    the cast loses nothing). ``Module.to`` keeps the ``Parameter`` objects, so the optimizers,
    created next, hold the float32 router weights. ``on_*_start`` re-checks the dtype as a fallback
    for strategies that convert by other means; ``teardown`` unwraps the plugin.

    Args:
        dtype: floating dtype for the routers (default ``torch.float32``).

    Raises:
        ValueError: when ``dtype`` is not a floating-point dtype.

    Example:
        >>> trainer = pl.Trainer(precision="bf16-true", callbacks=[RouterPrecision()])  # doctest: +SKIP
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}: dtype={dtype!r} must be a floating torch.dtype, "
                             "e.g. torch.float32")
        self.dtype = dtype
        self._patched: tuple[Any, Any] | None = None

    def _wrap_convert(self, plugin: Any) -> None:
        original = plugin.convert_module
        had_own = "convert_module" in vars(plugin)

        def convert_module(module: nn.Module) -> nn.Module:
            saved = [(router, {k: v.detach().clone() for k, v in router.state_dict(keep_vars=True).items()})
                     for router in _routers(module)]
            converted = original(module)
            for router, state in saved:
                self._restore(router, state)
            return module if converted is None else converted

        plugin.convert_module = convert_module
        self._patched = (plugin, original if had_own else None)

    @torch.no_grad()
    def _restore(self, router: nn.Module, state: dict[str, Tensor]) -> None:
        router.to(dtype=self.dtype)
        for name, tensor in router.state_dict(keep_vars=True).items():
            if name in state and tensor.is_floating_point():
                tensor.copy_(state[name])

    def _unwrap(self) -> None:
        if self._patched is None:
            return
        plugin, original = self._patched
        if original is None:
            vars(plugin).pop("convert_module", None)
        else:
            plugin.convert_module = original
        self._patched = None

    def enforce(self, pl_module: nn.Module) -> int:
        """Cast every router of ``pl_module`` whose tensors are not in ``dtype``; returns how many were cast."""
        cast = 0
        for router in _routers(pl_module):
            tensors = list(router.parameters()) + list(router.buffers())
            if any(t.is_floating_point() and t.dtype != self.dtype for t in tensors):
                router.to(dtype=self.dtype)
                cast += 1
        return cast

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()
        self._wrap_convert(trainer.strategy.precision_plugin)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enforce(pl_module):
            rank_zero_warn(f"{type(self).__name__}: the strategy cast routers after setup; they were cast back to "
                           f"{self.dtype} (values rounded once)")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.enforce(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.enforce(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.enforce(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()


class NonFiniteGuard(Callback):
    """Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

    After the backward and before the optimizer updates (``on_before_optimizer_step``), the guard
    checks the step's losses (seen in ``on_before_backward``, accumulated micro-batches included)
    and every gradient of the optimizer. All ranks agree: any rank's non-finite value skips the
    step everywhere (``strategy.reduce_boolean_decision``). A skip sets the gradients to ``None``:
    ``torch.optim`` optimizers leave a parameter without a gradient untouched (no update, no
    momentum, no weight decay, no Adam step count), unlike zeroed gradients, which still let
    momentum and weight decay move the weights. Learning-rate schedulers still advance. Skips are
    counted in ``skipped_steps`` and logged as ``moe/skipped_steps``. After ``max_consecutive``
    skips in a row the guard raises ``FloatingPointError`` naming the global step: the weights are
    those of the last good step, so ``trainer.save_checkpoint(path)`` still writes a usable
    checkpoint.

    Under a ``GradScaler`` (``16-mixed`` on CUDA) gradient overflow is the scaler's business (it
    skips and lowers the scale); the guard then checks losses only.

    NOTE: one host sync per optimizer step (the finiteness flag), plus one all-reduce under DDP.

    Args:
        max_consecutive: skipped steps in a row that stop training (>= 1).
        check_grads: also check gradients (not only losses).

    Raises:
        ValueError: when ``max_consecutive < 1``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuard(max_consecutive=3)])  # doctest: +SKIP
    """

    def __init__(self, max_consecutive: int = 3, check_grads: bool = True) -> None:
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"{type(self).__name__}: max_consecutive={max_consecutive!r} must be an int >= 1")
        self.max_consecutive = max_consecutive
        self.check_grads = check_grads
        self.skipped_steps = 0
        self.consecutive = 0
        self._bad_loss: Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # stays on device: no sync per micro-batch
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        flags = [] if self._bad_loss is None else [self._bad_loss]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.check_grads and scaler is None:
            flags += [~torch.isfinite(p.grad).all() for p in params]
        self._bad_loss = None
        local_bad = bool(torch.stack(flags).any()) if flags else False
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if bad:
            self._skip(trainer, pl_module, params, local_bad)
        else:
            self.consecutive = 0
        pl_module.log("moe/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False,
                      reduce_fx="max", batch_size=1)
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{type(self).__name__}: {self.consecutive} optimizer steps in a row had a non-finite loss or "
                f"gradient (the last at global step {trainer.global_step}, epoch {trainer.current_epoch}); stopped "
                "with the weights of the last finite step in place (save them with trainer.save_checkpoint). "
                "Check the data for NaN/inf, lower the learning rate, clip gradients, or keep routers in float32 "
                "(RouterPrecision)"
            )

    def _skip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], local_bad: bool):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        culprits = [names.get(id(p), "?") for p in params
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())][:3]
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        where = f"non-finite gradients in {culprits}" if culprits else "a non-finite loss"
        if not local_bad:
            where = "another rank's non-finite loss or gradients"
        rank_zero_warn(f"{type(self).__name__}: skipped the optimizer step at global step {trainer.global_step} "
                       f"({where}); {self.consecutive}/{self.max_consecutive} in a row")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.consecutive = state_dict.get("consecutive", 0)
