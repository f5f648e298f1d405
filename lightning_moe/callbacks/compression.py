"""Compression callbacks: quantize or factor the experts at the end of fit or before test.

Thin callbacks over :func:`lightning_moe.compress.quantize_experts` and
:func:`lightning_moe.compress.low_rank_experts`, so ``trainer.test`` measures the compressed
model on the Trainer the user already has.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_moe.compress import (
    CompressionReport,
    LowRankGroupedExperts,
    QuantizedGroupedExperts,
    energy_ranks,
    low_rank_experts,
    quantize_experts,
)
from lightning_moe.distributed.expert_parallel import expert_group
from lightning_moe.distributed.gather import gather_experts
from lightning_moe.nn.moe import find_moe_layers

APPLY_ON = ("fit_end", "test_start")


class _CompressExperts(Callback):
    def __init__(self, apply_on: str) -> None:
        if apply_on not in APPLY_ON:
            raise ValueError(f"{type(self).__name__}: apply_on={apply_on!r} must be one of {APPLY_ON}")
        self.apply_on = apply_on
        self.report: CompressionReport | None = None

    def compress(self, module: nn.Module) -> CompressionReport:
        raise NotImplementedError

    def _apply(self, pl_module: pl.LightningModule) -> None:
        report = self.compress(pl_module)
        if report.layers or self.report is None:  # a second call finds nothing left to compress
            self.report = report
        if report.layers:
            rank_zero_info(f"{type(self).__name__}: {report}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_on == "fit_end":
            self._apply(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_on == "test_start":
            self._apply(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_on == "test_start":
            gather_compressed_shards(pl_module)


@torch.no_grad()
def gather_compressed_shards(module: nn.Module) -> int:
    """Give compressed expert banks sharded by expert parallelism all their experts back, on every rank.

    Under ``strategy="moe"`` with ``expert_parallel_size > 1``, ``on_test_start`` compresses each
    rank's shard; the strategy's end-of-stage gather knows only ``GroupedExperts`` tensors, so this
    gathers every per-expert tensor of a compressed bank over the layer's expert group (shards are
    contiguous, in EP-rank order) and removes the dispatcher: after ``trainer.test`` the module is
    the full compressed model on every rank. A collective: every rank of the group calls it.

    Returns:
        The number of banks gathered.
    """
    gathered = 0
    for _, layer in find_moe_layers(module):
        bank, group = layer.experts, expert_group(layer)
        if group is None or bank.num_experts == layer.num_experts:
            continue
        if not isinstance(bank, (QuantizedGroupedExperts, LowRankGroupedExperts)):
            continue  # the strategy gathers GroupedExperts and TemplateExperts itself
        size, local = dist.get_world_size(group), bank.num_experts
        for name, param in list(bank.named_parameters(recurse=False)):
            if param.dim() and param.shape[0] == local:
                setattr(bank, name, nn.Parameter(gather_experts(param, group), param.requires_grad))
        for name, buffer in list(bank.named_buffers(recurse=False)):
            if buffer.dim() and buffer.shape[0] == local:
                setattr(bank, name, gather_experts(buffer, group))
        bank.num_experts, bank.expert_offset = local * size, 0
        layer.expert_dispatcher = None
        gathered += 1
    return gathered


class ExpertQuantization(_CompressExperts):
    """Weight-only int8 quantization of every expert bank, at the end of fit or before test.

    See :func:`lightning_moe.compress.quantize_experts`. The result is in ``report`` (bytes per
    bank before and after; about 4x smaller float32 experts) and is logged on rank 0. Under expert
    parallelism (``strategy="moe"``) use ``apply_on="test_start"``: each rank quantizes the experts
    it holds, the test runs expert-parallel, and ``on_test_end`` gathers the quantized experts so
    every rank ends with the full model (the strategy cannot shard an already compressed bank, so
    a later ``fit``/``test`` under ``expert_parallel_size > 1`` needs an uncompressed model).
    Inference only: quantized experts have no trainable weights, so quantize after the last ``fit``.

    Args:
        bits: 8.
        apply_on: ``"test_start"`` (default: ``trainer.test`` quantizes, then measures) or
            ``"fit_end"`` (quantize when ``fit`` finishes).
        include_shared: quantize shared experts too.
        kernel: ``"dequant"`` or ``"int8_mm"``.

    Raises:
        ValueError: for ``bits != 8`` or an unknown ``apply_on``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[ExpertQuantization()])  # doctest: +SKIP
        >>> trainer.fit(model); trainer.test(model)  # test measures the int8 experts  # doctest: +SKIP
    """

    def __init__(self, bits: int = 8, apply_on: str = "test_start", include_shared: bool = True,
                 kernel: str = "dequant") -> None:
        super().__init__(apply_on)
        if bits != 8:
            raise ValueError(f"{type(self).__name__}: bits={bits} must be 8; only int8 weight-only quantization is "
                             "implemented")
        self.bits = bits
        self.include_shared = include_shared
        self.kernel = kernel

    def compress(self, module: nn.Module) -> CompressionReport:
        return quantize_experts(module, self.bits, self.include_shared, self.kernel)


class LowRankExperts(_CompressExperts):
    """Truncated-SVD factorization of every expert weight, at the end of fit or before test.

    See :func:`lightning_moe.compress.low_rank_experts`; the saving is in ``report``. The factors
    are trainable parameters: with ``apply_on="fit_end"`` a later ``fit`` (with a fresh optimizer)
    fine-tunes the compressed model (on one device or DDP; the expert-parallel strategy shards only
    uncompressed banks). Under expert parallelism ``apply_on="test_start"`` works as for
    :class:`ExpertQuantization`.

    Args:
        rank: fixed rank for every weight, or None to pick it by ``energy``.
        energy: fraction of squared singular values each expert weight keeps, in (0, 1].
        apply_on: ``"test_start"`` (default) or ``"fit_end"``.
        include_shared: factor shared experts too.

    Raises:
        ValueError: for ``rank < 1``, ``energy`` outside (0, 1] or an unknown ``apply_on``.

    In a job of several processes with ``rank=None``, the processes first agree on each weight's rank
    (the largest any of them picks by ``energy``, as one process holding every expert would pick),
    so every shard factors to the same shapes and gathers (:func:`agree_on_ranks`).

    Example:
        >>> trainer = pl.Trainer(callbacks=[LowRankExperts(energy=0.95)])  # doctest: +SKIP
    """

    def __init__(self, rank: int | None = None, energy: float = 0.9, apply_on: str = "test_start",
                 include_shared: bool = True) -> None:
        super().__init__(apply_on)
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{type(self).__name__}: rank={rank!r} must be a positive int, or None to choose by "
                             "energy")
        if not 0 < energy <= 1:
            raise ValueError(f"{type(self).__name__}: energy={energy!r} must be in (0, 1], e.g. 0.9")
        self.rank = rank
        self.energy = energy
        self.include_shared = include_shared

    def compress(self, module: nn.Module) -> CompressionReport:
        ranks = None
        if self.rank is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = agree_on_ranks(energy_ranks(module, self.energy, self.include_shared))
        return low_rank_experts(module, self.rank, self.energy, self.include_shared, ranks)


def agree_on_ranks(ranks: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The largest of each rank over all processes (a collective: every process passes the same banks and weights).

    Under expert parallelism each process factors the experts it holds: with ranks picked by energy, each
    would pick its own and the shards would not gather (and a weight one process keeps dense another
    factors). The largest rank keeps at least ``energy`` of every expert's weight, as one process would.
    """
    keys = [(path, name) for path in sorted(ranks) for name in sorted(ranks[path])]
    if not keys:
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    values = torch.tensor([ranks[path][name] for path, name in keys], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    out: dict[str, dict[str, int]] = {}
    for (path, name), value in zip(keys, values.tolist(), strict=True):
        out.setdefault(path, {})[name] = int(value)
    return out
