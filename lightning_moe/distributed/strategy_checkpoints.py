"""How :class:`~lightning_moe.MoEStrategy` saves and loads: a full file, or a DCP directory (DDP or FSDP2 shards).

A mixin of the strategy, one concept: checkpoints. The formats themselves live beside it:
:mod:`~lightning_moe.distributed.full_checkpoint` (one file, the logical model gathered to rank 0),
:mod:`~lightning_moe.distributed.sharded_checkpoint` (DCP, expert-parallel shards of a DDP model) and
:mod:`~lightning_moe.distributed.fsdp_checkpoint` (DCP, the live FSDP2 shards). All use the logical names and
shapes of the unsharded model, so each reshards on resume and loads in a plain process (after
``consolidate_checkpoint`` for a directory). Full files are read with ``torch.load(mmap=True)``: each rank copies
only its own slices out of the mapped file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_moe import _compat, prune
from lightning_moe.distributed import atomic, fsdp, fsdp_checkpoint, full_checkpoint, sharded_checkpoint
from lightning_moe.distributed.shard_layout import (
    OptimizerLayout,
    ShardLayout,
    local_model_state,
    local_optimizer_state,
)
from lightning_moe.distributed.strategy_meshes import StrategyMeshes

__all__ = ["StrategyCheckpoints", "unwrap_optimizer"]


class StrategyCheckpoints(StrategyMeshes):
    """The checkpoint half of :class:`~lightning_moe.MoEStrategy` (its base class): state dicts, save, load.

    Reads the strategy's ``_checkpoint``, ``_layout()`` and ``_released_layouts``.
    """

    _checkpoint: str
    _released_layouts: dict[int, OptimizerLayout]

    def _layout(self) -> ShardLayout:
        raise NotImplementedError

    @property
    def _set_up_module(self) -> Any:
        """The LightningModule (set up: never None here)."""
        module = self.lightning_module
        assert module is not None
        return module

    def _shrink_to_saved(self, shapes: Mapping[str, Any]) -> None:
        # A checkpoint written after ExpertPruning holds fewer experts: shrink (and re-shard) those layers
        # before reading their slices, with the optimizers following the new parameters; then re-wrap DDP.
        optimizers, module = [unwrap_optimizer(o) for o in self.optimizers], self.lightning_module
        assert module is not None
        if prune.shrink_to_saved(module, prune.saved_expert_counts(shapes), optimizers):
            if isinstance(self.model, DistributedDataParallel):
                self.model = self.lightning_module
                self.configure_ddp()


    def _gather_args(self) -> tuple[dist.ProcessGroup, bool, bool]:
        # The expert group holding global rank 0 gathers to it; other groups keep their shards.
        group = self.expert_group
        return group, self.global_rank < self.expert_parallel_size, self.global_rank == 0

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self._set_up_module
        if self._data_parallel == "fsdp":
            fsdp.reshard(module)
            return fsdp_checkpoint.model_state(module, self._layout(), self.device_mesh)
        state = module.state_dict()
        layout = self._layout()
        if not layout.shards:
            return state
        if self._checkpoint == "sharded":
            return sharded_checkpoint.sharded_model_state(state, layout, self.device_mesh)
        group, member, is_dst = self._gather_args()
        return full_checkpoint.gather_model_state(state, layout, group, is_dst, self.root_device) if member else state

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        optimizer = unwrap_optimizer(optimizer)
        layout = self._layout()
        if self._data_parallel == "fsdp":
            olayout = OptimizerLayout(optimizer, self._set_up_module, layout)
            return fsdp_checkpoint.optimizer_state(optimizer, olayout, self.device_mesh)
        if self._checkpoint == "sharded":
            olayout = OptimizerLayout(optimizer, self._set_up_module, layout)
            return sharded_checkpoint.sharded_optimizer_state(optimizer, olayout, self._device_mesh)
        if id(optimizer) in self._released_layouts:  # saved after fit: the optimizer holds fit's expert shards
            olayout = self._released_layouts[id(optimizer)]
        elif layout.shards:
            olayout = OptimizerLayout(optimizer, self._set_up_module, layout)
        else:
            return optimizer.state_dict()
        group, member, is_dst = self._gather_args()
        if not member:
            return optimizer.state_dict()
        return full_checkpoint.gather_optimizer_state(optimizer, olayout, group, is_dst, self.root_device)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _compat.PATH,
                        storage_options: Any | None = None) -> None:
        # Both formats are written under a temporary name and renamed once complete (distributed/atomic.py):
        # a rank killed during a save leaves the previous checkpoint loadable.
        if self._checkpoint == "full":
            if not atomic.is_local(filepath):
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            if self.is_global_zero:
                atomic.write_file(lambda p: self.checkpoint_io.save_checkpoint(checkpoint, p, storage_options),
                                  Path(filepath))
            return None
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}(checkpoint='sharded') writes with torch.distributed.checkpoint "
                            "and takes no storage_options")
        path = Path(self.broadcast(str(filepath)))
        partial = atomic.partial_path(path)
        if self.is_global_zero:
            atomic.clear_partial(path)
        self.barrier()
        sharded_checkpoint.save_sharded(checkpoint, partial, self.is_global_zero)
        self.barrier()
        if self.is_global_zero:
            atomic.replace_directory(partial, path)
        self.barrier()
        return None

    @override
    def load_checkpoint(self, checkpoint_path: _compat.PATH, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is None:  # Lightning drops the user's value for strategies that restore after setup
            weights_only = _compat.running_weights_only()
        path = Path(self.broadcast(str(checkpoint_path)))
        if self._data_parallel == "fsdp":
            if not sharded_checkpoint.is_sharded_checkpoint(path):
                raise ValueError(f"{type(self).__name__}(data_parallel='fsdp'): {str(path)!r} is not a DCP checkpoint "
                                 "directory; resume a full file under data_parallel='ddp' (or load its weights in "
                                 "on_load_checkpoint)")
            optimizers = [unwrap_optimizer(o) for o in self.optimizers]
            return fsdp_checkpoint.load(path, self._set_up_module, optimizers, self._layout(), self.device_mesh,
                                        weights_only)
        if not sharded_checkpoint.is_sharded_checkpoint(path):
            if type(self.checkpoint_io) is TorchCheckpointIO and path.is_file():
                # NOTE: mapped, not read: each rank copies only its slices (its experts) out of the file.
                return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
            return super().load_checkpoint(path, weights_only=weights_only)
        self._shrink_to_saved(sharded_checkpoint.saved_model_shapes(path))
        module, layout = self._set_up_module, self._layout()
        olayouts = [OptimizerLayout(unwrap_optimizer(o), module, layout) for o in self.optimizers]
        return sharded_checkpoint.load_sharded(path, module.state_dict(), olayouts, layout, self._device_mesh,
                                               weights_only)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._data_parallel == "fsdp":
            return  # load_checkpoint read the shards in place
        module = self._set_up_module
        self._shrink_to_saved({k: v.shape for k, v in checkpoint["state_dict"].items() if isinstance(v, Tensor)})
        state = local_model_state(checkpoint["state_dict"], module.state_dict(), self._layout())
        module.load_state_dict(state, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._data_parallel == "fsdp":
            return  # load_checkpoint read the optimizer states in place
        layout = self._layout()
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer = unwrap_optimizer(optimizer)
            olayout = OptimizerLayout(optimizer, self._set_up_module, layout)
            optimizer.load_state_dict(local_optimizer_state(saved, olayout))
            _compat.optimizer_to_device(optimizer, self.root_device)


def unwrap_optimizer(optimizer: Optimizer) -> Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
