"""The meshes and process groups of :class:`~lightning_moe.MoEStrategy` (its base class), and how models are built.

Ranks ``[k * P, (k + 1) * P)`` form expert group ``k`` of the ``("data", "expert")`` device mesh; with
``data_parallel="fsdp"`` a 1-D ``("world",)`` mesh of every rank shards the dense parameters. Models are built
on the meta device under FSDP (``configure_model``, ``Trainer.init_module(empty_init=True)``) and materialised
in ``setup``. On torch's fake process group (a dry run, :mod:`lightning_moe.distributed.fake`), Lightning's
object collectives answer as if every rank were this one.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from typing_extensions import override

from lightning_moe.distributed import fake, launcher
from lightning_moe.distributed.expert_parallel import ExpertParallelDispatcher, check_expert_parallel_size
from lightning_moe.nn.moe import find_moe_layers

__all__ = ["StrategyMeshes"]


class StrategyMeshes(DDPStrategy):
    """Meshes, groups and model-building contexts of :class:`~lightning_moe.MoEStrategy` (its base class).

    Reads the strategy's ``_expert_parallel_size``, ``_data_parallel``, ``_device_mesh`` and ``_world_mesh``.
    """

    _expert_parallel_size: int | None
    _data_parallel: str
    _device_mesh: Any
    _world_mesh: Any

    @property
    def expert_parallel_size(self) -> int:
        """Ranks in one expert group (the world size unless given)."""
        return self._expert_parallel_size or self.world_size

    @property
    def device_mesh(self):
        """The ``("data", "expert")`` :class:`~torch.distributed.device_mesh.DeviceMesh` (after set-up)."""
        if self._device_mesh is None:
            raise RuntimeError(f"{type(self).__name__}: the device mesh exists once the trainer set up the strategy")
        return self._device_mesh

    @property
    def expert_group(self) -> dist.ProcessGroup:
        """Process group of this rank's expert group (the all-to-all group)."""
        return self.device_mesh.get_group("expert")

    @property
    def expert_data_group(self) -> dist.ProcessGroup:
        """Process group of the ranks holding the same experts (expert gradients are summed over it)."""
        return self.device_mesh.get_group("data")

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Shard first, then read each rank's slice of the (full or DCP) checkpoint.
        return True

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        self._launcher = launcher.watched(self._launcher, self.cluster_environment, self.num_processes, self.num_nodes)

    @property
    def world_mesh(self):
        """1-D :class:`~torch.distributed.device_mesh.DeviceMesh` of every rank (FSDP's dense parameters)."""
        if self._world_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._world_mesh = init_device_mesh(self.root_device.type, (self.world_size,), mesh_dim_names=("world",))
        return self._world_mesh

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        launcher.start_peer_watchdog()
        launcher.destroy_process_groups_at_exit(self)
        ep, world = self.expert_parallel_size, self.world_size
        check_expert_parallel_size([], ep, world, type(self).__name__)
        mesh = self._device_mesh
        if mesh is None or mesh.mesh.shape != (world // ep, ep):
            from torch.distributed.device_mesh import init_device_mesh

            self._device_mesh = init_device_mesh(
                self.root_device.type, (world // ep, ep), mesh_dim_names=("data", "expert")
            )
            self._world_mesh = None

    def release_process_groups(self) -> None:
        """Let go of the process groups the strategy and its model hold: the device meshes, and the expert
        group of each layer's :class:`~lightning_moe.distributed.ExpertParallelDispatcher`.

        Called at exit, before the groups are destroyed (:func:`~lightning_moe.distributed.launcher.
        destroy_process_groups_at_exit`), so that destroying them stops their threads. Not for use before
        exit: the layers would exchange over the default group. Parameters sharded by FSDP keep their mesh.
        """
        self._device_mesh = None
        self._world_mesh = None
        module = self.lightning_module
        for _, layer in find_moe_layers(module) if module is not None else []:
            if isinstance(layer.expert_dispatcher, ExpertParallelDispatcher):
                layer.expert_dispatcher.group = None

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        if self._data_parallel != "fsdp" or not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():  # materialised in setup
            yield

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        # With FSDP, configure_model builds on meta: setup shards, then allocates each rank's shards only.
        if self._data_parallel != "fsdp":
            yield
            return
        with torch.device("meta"):
            yield

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        # NOTE: the fake backend (a dry run) moves no data: every rank is this rank.
        return obj if fake.is_fake_backend() else super().broadcast(obj, src)

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        if fake.is_fake_backend() and isinstance(tensor, Tensor):
            return fake.mirror_reduce(tensor, reduce_op, self.world_size)
        return super().reduce(tensor, group, reduce_op)
