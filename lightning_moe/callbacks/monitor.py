"""``ExpertLoadMonitor``: a heatmap of where the tokens go (MoE layers x experts), every N steps.

Between renders it only adds the counts the layers already keep (``tokens_per_expert``,
``dropped_tokens``, ``routed_tokens``) to an accumulator on their device: no host sync on the hot
path. A render sums the accumulators over processes (one all-reduce), draws on rank 0 with
matplotlib (Agg canvas, no display) and sends the picture to the trainer's loggers.

Shape legend (the package's, see :mod:`lightning_moe.nn`): Y MoE layers, E experts.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, TypeGuard

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_moe.nn.moe import MoE, find_moe_layers

_INSTALL_HINT = "pip install 'lightning-moe[examples]'"


class _ImageLogger(Protocol):
    """A logger with ``log_image`` (e.g. ``WandbLogger``)."""

    def log_image(self, key: str, images: list[Any], step: int | None = None) -> None: ...


def _logs_images(logger: object) -> TypeGuard[_ImageLogger]:
    return callable(getattr(logger, "log_image", None))


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ModuleNotFoundError(
            f"ExpertLoadMonitor draws its heatmaps with matplotlib, which is not installed; "
            f"install the extra: {_INSTALL_HINT}"
        ) from err


class ExpertLoadMonitor(Callback):
    """Every ``every_n_steps`` optimizer steps, render the share of tokens each expert received.

    The picture has one row per MoE layer (found by type in any LightningModule) and one column per
    expert, coloured by the layer's share of token->expert assignments since the last render
    (counted before capacity drops), with the share of dropped assignments per layer beside it.
    It goes to every logger that takes images: ``TensorBoardLogger`` (``add_image``) and loggers
    with ``log_image`` (e.g. ``WandbLogger``). When none does (or ``save_png=True``), it is written
    as ``<log_dir>/expert_load/step_<step>.png`` (``trainer.log_dir``, else ``default_root_dir``).
    A last picture covers the steps after the last render when training ends.

    Args:
        every_n_steps: render every this many optimizer steps (``trainer.global_step``).
        tag: image name in the loggers.
        save_png: True: always write PNGs; False: never; None: only when no logger takes images.
        figsize: figure size in inches; default grows with layers and experts.
        dpi: dots per inch; the image is ``figsize * dpi`` pixels.
        cmap: matplotlib colour map of the heatmap.

    Raises:
        ModuleNotFoundError: matplotlib is missing (``pip install 'lightning-moe[examples]'``).
        ValueError: a non-positive ``every_n_steps`` or ``dpi``, or a bad ``figsize``.

    Example:
        >>> from lightning_moe.callbacks import ExpertLoadMonitor
        >>> monitor = ExpertLoadMonitor(every_n_steps=50)
        >>> # Trainer(callbacks=[monitor], ...)
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        tag: str = "moe/expert_load",
        save_png: bool | None = None,
        figsize: tuple[float, float] | None = None,
        dpi: int = 100,
        cmap: str = "viridis",
    ) -> None:
        _require_matplotlib()
        name = type(self).__name__
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
            raise ValueError(f"{name}: every_n_steps={every_n_steps!r} must be a positive int")
        if not isinstance(dpi, int) or dpi <= 0:
            raise ValueError(f"{name}: dpi={dpi!r} must be a positive int")
        if figsize is not None and (len(figsize) != 2 or not all(s > 0 for s in figsize)):
            raise ValueError(f"{name}: figsize={figsize!r} must be (width, height) in inches, both > 0")
        self.every_n_steps = every_n_steps
        self.tag = tag
        self.save_png = save_png
        self.figsize = figsize
        self.dpi = dpi
        self.cmap = cmap
        self.last_png: str | None = None  # path of the last PNG written
        self._reset([])

    def _reset(self, layers: list[tuple[str, MoE]]) -> None:
        self._layers = layers
        self._seen: list[int] = [layer.forward_count for _, layer in layers]
        self._sizes = [layer.num_experts for _, layer in layers]  # E_l of the window (pruning changes them)
        self._counts: Tensor | None = None  # [sum_l E_l] token->expert assignments per expert
        self._dropped: Tensor | None = None  # [L]
        self._assignments: Tensor | None = None  # [L]
        self._batches = 0
        self._window_step = 0  # global step after the last counted batch
        self._last_step = -1

    def __getstate__(self) -> dict:
        # A copy starts fresh (layers are found again at on_train_start): it holds no layer or accumulator.
        state = self.__dict__.copy()
        state.update(_layers=[], _seen=[], _counts=None, _dropped=None, _assignments=None, _batches=0)
        return state

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset(find_moe_layers(pl_module))

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._layers:
            return
        if [layer.num_experts for _, layer in self._layers] != self._sizes:
            # Experts were removed (ExpertPruning) since the last batch: draw the window so far with the
            # experts it counted, then count the layers at their new size, this batch included.
            before, seen = [layer for _, layer in self._layers], self._seen
            if self._batches and self._counts is not None:
                self._render(trainer, pl_module, self._window_step)
            else:
                self._reset(find_moe_layers(pl_module))
            if [id(layer) for layer in before] == [id(layer) for _, layer in self._layers]:
                self._seen = seen
        # A layer counts when it ran since the last batch.
        ran = [layer.forward_count != seen for (_, layer), seen in zip(self._layers, self._seen, strict=True)]
        self._seen = [layer.forward_count for _, layer in self._layers]
        counts = torch.cat([layer.tokens_per_expert * r for (_, layer), r in zip(self._layers, ran, strict=True)])
        dropped = torch.stack([layer.dropped_tokens * r for (_, layer), r in zip(self._layers, ran, strict=True)])
        assignments = torch.stack([layer.assignments * r for (_, layer), r in zip(self._layers, ran, strict=True)])
        if self._counts is None or self._dropped is None or self._assignments is None:  # all set together
            self._counts, self._dropped, self._assignments = counts, dropped, assignments
        else:
            self._counts += counts
            self._dropped += dropped
            self._assignments += assignments
        self._batches += 1
        step = self._window_step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._render(trainer, pl_module, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._batches and self._counts is not None:
            self._render(trainer, pl_module, trainer.global_step)

    # -- rendering -------------------------------------------------------------------------------

    def _render(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        layers, sizes = self._layers, self._sizes
        # Callers render a window that counted a batch (the three accumulators are set together).
        assert self._counts is not None and self._dropped is not None and self._assignments is not None
        state = torch.cat([self._counts, self._dropped, self._assignments])
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(state, op=dist.ReduceOp.SUM)
        loggers = [lg for lg in trainer.loggers
                   if isinstance(lg, TensorBoardLogger) or _logs_images(lg)]
        write_png = self.save_png or (self.save_png is None and not loggers)
        # trainer.log_dir broadcasts: every rank calls it.
        log_dir = (trainer.log_dir or trainer.default_root_dir) if write_png else None
        # Layers may have been added (upcycling) since training started: pick them up for the next window.
        self._reset(find_moe_layers(pl_module))
        self._last_step = step
        if not trainer.is_global_zero:
            return
        counts_Y = [c.cpu() for c in state[: sum(sizes)].split(sizes)]
        dropped_Y = state[sum(sizes): sum(sizes) + len(layers)].cpu()
        assignments_Y = state[sum(sizes) + len(layers):].cpu()
        image = self.render(
            [name for name, _ in layers], counts_Y, dropped_Y.double() / assignments_Y.clamp_min(1).double(), step
        )
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, image, global_step=step, dataformats="HWC")
            elif _logs_images(logger):
                logger.log_image(key=self.tag, images=[image], step=step)
        if log_dir is not None:
            import matplotlib.image

            path = os.path.join(log_dir, "expert_load", f"step_{step:07d}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            matplotlib.image.imsave(path, image)
            self.last_png = path

    def render(self, names: list[str], counts: list[Tensor], dropped_share: Tensor, step: int) -> Any:
        """Draw the heatmap.

        Args:
            names: layer names (rows).
            counts: per layer, assignments per expert ``[E_l]``.
            dropped_share: per layer, dropped share of assignments ``[L]``.
            step: the global step, for the title.

        Returns:
            ``numpy.ndarray`` ``uint8 [height, width, 3]``, ``figsize * dpi`` pixels.
        """
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        num_layers, max_experts = len(counts), max(int(c.numel()) for c in counts)
        share_YE = np.full((num_layers, max_experts), np.nan)
        for i, c in enumerate(counts):  # once per render, not per step
            c = c.double()
            share_YE[i, : c.numel()] = (c / c.sum().clamp_min(1)).numpy()
        figsize = self.figsize or (min(5.0 + 0.4 * max_experts, 24.0), min(2.0 + 0.4 * num_layers, 24.0))
        fig = Figure(figsize=figsize, dpi=self.dpi, layout="constrained")
        canvas = FigureCanvasAgg(fig)
        ax, side = fig.subplots(1, 2, sharey=True, width_ratios=(4, 1))
        heat = ax.imshow(share_YE, aspect="auto", cmap=self.cmap, vmin=0.0, interpolation="nearest")
        ax.set_yticks(range(num_layers), labels=[n[-24:] for n in names], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"share of tokens per expert, step {step}", fontsize=9)
        if max_experts * num_layers <= 128:  # numbers in the cells while they fit
            for (i, e), share in np.ndenumerate(share_YE):
                if not np.isnan(share):
                    ax.text(e, i, f"{100 * share:.0f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(heat, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=7)
        drops = dropped_share.numpy()
        side.barh(range(num_layers), drops, color="tab:red")
        side.set_xlim(0.0, max(float(drops.max()) if num_layers else 0.0, 0.01) * 1.3)
        side.set_title("dropped", fontsize=9)
        side.tick_params(labelleft=False, labelsize=7)
        for i, share in enumerate(drops):
            side.text(0, i, f" {100 * share:.1f}%", va="center", fontsize=6)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


__all__ = ["ExpertLoadMonitor"]
