"""The count reduction of the global and sequence loss scopes over a process group.

:class:`ProcessGroupCountReduction` implements :class:`~lightning_moe.nn.reduce.CountReduction` with one
functional all-reduce per layer forward (torch's ``all_reduce`` from ``_functional_collectives``): it is
started right after routing and waited for when the losses are formed, so the small integer sum travels
while the experts run, and nothing comes to the host. :func:`install_count_reduction` puts one on every
MoE layer of a module; ``MoEStrategy.setup`` calls it over the whole world (every rank trains on a
different part of the batch: the data and expert dims of its mesh), and other strategies can too.

Why its own collective rather than riding on the expert-parallel count exchange: that exchange is an
all-to-all over the expert group only (the data dim would still need a second collective), carries the
counts *after* capacity drops (the loss needs them before), and exists only when experts are sharded.
Measured on 2 gloo ranks (``benchmarks/aux_scope.py``, a 4-layer decoder at expert parallelism 2): the
global scope's step took 0.94x the local one's, i.e. the separate asynchronous all-reduce is lost in the
noise of a training step, so folding it into the dispatch would buy nothing measurable.

Shape legend: X = E + 2 entries of the reduced vector (see :mod:`lightning_moe.nn.reduce`).
"""

from __future__ import annotations

from typing import cast

import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe._compat import funcol
from lightning_moe.nn.moe import find_moe_layers


class ProcessGroupCountReduction:
    """Sums routing counts over every rank of a process group (a :class:`~lightning_moe.nn.reduce.CountReduction`).

    Args:
        group: the ranks that train on different parts of the batch (None: the default group, the world).

    Example (inside an initialised process group)::

        layer.count_reduction = ProcessGroupCountReduction()   # or install_count_reduction(model)
        loss = task_loss + layer(x).aux_loss                   # f_i of the global batch, times W
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        # The functional collective takes no None: resolve the default group now.
        self.group = cast(dist.ProcessGroup, group if group is not None else dist.group.WORLD)
        self.size = dist.get_world_size(self.group)

    def start(self, counts_X: Tensor) -> Tensor:
        # NOTE: asynchronous: returns at once; the sum is waited for in wait(), on the device, not the host.
        return funcol.all_reduce(counts_X, "sum", self.group)

    def wait(self, pending_X: Tensor) -> Tensor:
        return funcol.wait_tensor(pending_X)

    def __deepcopy__(self, memo: dict) -> ProcessGroupCountReduction:
        # A process group is a handle (it cannot be copied): a copied layer sums over the same ranks.
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def install_count_reduction(module: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make every MoE layer under ``module`` sum its routing counts over ``group`` (global/sequence scopes).

    Every rank of ``group`` must call it, and afterwards run each layer's training forward as often as
    its peers (each is a collective, as under expert parallelism). Call :func:`remove_count_reduction`
    before the group is destroyed.

    Args:
        module: the model (its MoE layers are found by type).
        group: the ranks that train on different parts of the batch; default the world.

    Returns:
        The number of ranks the layers now sum over (W).
    """
    reduction = ProcessGroupCountReduction(group)
    for _, layer in find_moe_layers(module):
        layer.count_reduction = reduction
    return reduction.size


def remove_count_reduction(module: nn.Module) -> None:
    """Give every MoE layer under ``module`` back its local reduction (losses of this rank's tokens)."""
    for _, layer in find_moe_layers(module):
        layer.count_reduction = None


__all__ = ["ProcessGroupCountReduction", "install_count_reduction", "remove_count_reduction"]
