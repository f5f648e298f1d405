"""MoEStrategy: expert parallelism for any LightningModule with :class:`~lightning_moe.MoE` layers.

``Trainer(strategy="moe")`` runs data parallelism for dense parameters (DDP) and expert parallelism
for the experts of every MoE layer, over a ``("data", "expert")`` device mesh:

- ranks ``[k * P, (k + 1) * P)`` form expert group ``k`` (contiguous, so one node first); each rank
  holds ``num_experts / P`` experts of every layer, under their global ids, and tokens travel to
  their experts by all-to-all in the group's own process group;
- dense parameters are all-reduced by DDP over all ranks; expert parameters are kept out of DDP and
  their gradients are summed over the ranks holding the same experts (the "data" dimension) and
  divided by the world size, so N-rank training equals single-process training on the global batch;
- every MoE layer's balancing and z losses (scope ``"global"``/``"sequence"``) sum their routing counts
  over the whole world through a count reduction installed in ``setup`` (:mod:`lightning_moe.nn.reduce`),
  so with them on too, N-rank training equals one process on the global batch;
- checkpoints hold the full logical model (one file, gathered to rank 0) or a
  torch.distributed.checkpoint directory (``checkpoint="sharded"``), and reshard on resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_moe import _compat, prune
from lightning_moe.distributed import atomic, full_checkpoint, gradients, launcher, sharded_checkpoint
from lightning_moe.distributed.count_reduction import install_count_reduction, remove_count_reduction
from lightning_moe.distributed.expert_parallel import (
    check_expert_parallel_size,
    expert_parameters,
    expert_shard,
    expert_state_names,
    shard_moe_layer,
    unshard_moe_layer,
)
from lightning_moe.distributed.launcher import PEER_FAILURE_GRACE_S as PEER_FAILURE_GRACE_S
from lightning_moe.distributed.launcher import launcher_gone as launcher_gone
from lightning_moe.distributed.shard_layout import (
    OptimizerLayout,
    ShardLayout,
    local_model_state,
    local_optimizer_state,
)
from lightning_moe.distributed.sharded_checkpoint import consolidate_checkpoint
from lightning_moe.nn.moe import find_moe_layers

CHECKPOINT_FORMATS = ("full", "sharded")

__all__ = ["MoEStrategy", "consolidate_checkpoint"]


class MoEStrategy(DDPStrategy):
    """DDP for dense parameters plus expert parallelism for :class:`~lightning_moe.MoE` layers.

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each holds
            ``num_experts / expert_parallel_size`` of every layer). Default: the world size. Must
            divide the world size and every layer's ``num_experts``.
        checkpoint: ``"full"`` writes one file with the full logical model, gathered to rank 0 (it
            loads with ``Model.load_from_checkpoint`` in a plain process), and gives the model back
            unsharded after ``fit``/``validate``/...; ``"sharded"`` writes a
            torch.distributed.checkpoint directory (each rank its shards) and leaves the model
            sharded, for models that do not fit one host.
        **ddp_kwargs: arguments of Lightning's ``DDPStrategy`` (``start_method``, ``timeout``,
            ``process_group_backend``, ...) and of ``DistributedDataParallel``.

    Raises:
        ValueError: for a bad ``expert_parallel_size`` or ``checkpoint``; before training, when the
            world size or a layer's ``num_experts`` is not a multiple of ``expert_parallel_size``.

    Example::

        trainer = L.Trainer(accelerator="gpu", devices=8, strategy="moe")             # EP = 8
        trainer = L.Trainer(devices=8, num_nodes=2, strategy=MoEStrategy(expert_parallel_size=8))
    """

    strategy_name = "moe"

    def __init__(self, expert_parallel_size: int | None = None, checkpoint: str = "full", **ddp_kwargs: Any) -> None:
        name = type(self).__name__
        if expert_parallel_size is not None and (
            not isinstance(expert_parallel_size, int) or isinstance(expert_parallel_size, bool)
            or expert_parallel_size < 1
        ):
            raise ValueError(f"{name}: expert_parallel_size={expert_parallel_size!r} must be a positive int, or None "
                             "for the world size")
        if checkpoint not in CHECKPOINT_FORMATS:
            raise ValueError(f"{name}: checkpoint={checkpoint!r} must be one of {CHECKPOINT_FORMATS}")
        if checkpoint == "sharded" and ddp_kwargs.get("start_method", "popen") != "popen":
            raise ValueError(f"{name}: checkpoint='sharded' keeps the model sharded after fit, which start_method="
                             f"{ddp_kwargs['start_method']!r} cannot copy back to the main process; use "
                             "checkpoint='full' or the default start_method='popen'")
        super().__init__(**ddp_kwargs)
        self._expert_parallel_size = expert_parallel_size
        self._checkpoint = checkpoint
        self._device_mesh = None
        self._trainer: pl.Trainer | None = None
        self._released_layouts: dict[int, OptimizerLayout] = {}
        self._pending_grads = gradients.PendingReduction()  # manual optimization: reduced at the step
        self._hand_clip = gradients.HandClipWatch(self._on_hand_clip)
        self._warned_hand_clip = False

    # ------------------------------------------------------------------------------------------
    # Mesh and groups

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

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        launcher.start_peer_watchdog()
        ep, world = self.expert_parallel_size, self.world_size
        check_expert_parallel_size([], ep, world, type(self).__name__)
        mesh = self._device_mesh
        if mesh is None or mesh.mesh.shape != (world // ep, ep):
            from torch.distributed.device_mesh import init_device_mesh

            self._device_mesh = init_device_mesh(
                self.root_device.type, (world // ep, ep), mesh_dim_names=("data", "expert")
            )

    # ------------------------------------------------------------------------------------------
    # Sharding

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:  # new optimizers; test/validate/predict keep fit's (and the layout of their state)
            self._released_layouts = {}
        module = self.lightning_module
        assert module is not None
        layers = find_moe_layers(module)
        ep, world = self.expert_parallel_size, self.world_size
        check_expert_parallel_size(layers, ep, world, type(self).__name__)
        mesh = self.device_mesh
        for path, layer in layers:
            if layer.layer_name is None:
                layer.layer_name = path
            shard = expert_shard(layer)
            if shard is not None:  # still sharded from an earlier stage (checkpoint="sharded")
                if shard.ep_size != ep:
                    raise ValueError(f"{type(self).__name__}: layer {path!r} is sharded over {shard.ep_size} ranks "
                                     f"by an earlier run, expert_parallel_size={ep} now; use the same size")
                continue
            self._broadcast_experts(layer)
            if ep > 1:
                shard_moe_layer(layer, path, mesh.get_local_rank("expert"), ep, self.expert_group)
        self._install_count_reduction()
        ignored = set(_compat.ddp_ignored_names(module)) | set(expert_state_names(module))
        _compat.set_ddp_ignored_names(module, sorted(ignored))
        if ep > 1:
            # Norm clipping must see the norm of the whole model, experts of every rank included.
            self.precision_plugin.clip_grad_by_norm = self.clip_grad_by_norm
        self._pending_grads.clear()
        self.precision_plugin.clip_gradients = self._clip_gradients  # manual optimization: reduce, then clip
        self._hand_clip.install()
        super().setup(trainer)

    @override
    def configure_ddp(self) -> None:
        # Expert names change after setup (magnitude pruning turns w1 into w1_orig + w1_mask, expert pruning
        # replaces parameters): every (re-)wrap keeps the experts' current names out of DDP.
        module = self.lightning_module
        assert module is not None
        _compat.set_ddp_ignored_names(module, sorted(set(_compat.ddp_ignored_names(module))
                                                     | set(expert_state_names(module))))
        super().configure_ddp()

    def _shrink_to_saved(self, shapes: Mapping[str, Any]) -> None:
        # A checkpoint written after ExpertPruning holds fewer experts: shrink (and re-shard) those layers
        # before reading their slices, with the optimizers following the new parameters; then re-wrap DDP.
        optimizers, module = [_unwrap(o) for o in self.optimizers], self.lightning_module
        assert module is not None
        if prune.shrink_to_saved(module, prune.saved_expert_counts(shapes), optimizers):
            if isinstance(self.model, DistributedDataParallel):
                self.model = self.lightning_module
                self.configure_ddp()

    def _install_count_reduction(self) -> None:
        """Balancing losses of scope "global"/"sequence" sum their routing counts over the whole world.

        Every rank trains on a different part of the batch (data x expert dims), so the sum spans the
        default group; the layers know no group (see :mod:`lightning_moe.nn.reduce`). Removed in teardown.
        """
        module = self.lightning_module
        if module is not None and self.world_size > 1:
            install_count_reduction(module, dist.group.WORLD)

    def _broadcast_experts(self, layer) -> None:
        # DDP broadcasts rank 0's dense weights; experts are outside DDP, so do the same for them.
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in list(layer.experts.parameters()) + list(layer.experts.buffers()):
                full = tensor.detach().to(self.root_device)
                dist.broadcast(full, src=0)
                tensor.copy_(full)

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        healthy = self._trainer is None or self._trainer.state.status != TrainerStatus.INTERRUPTED
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)
        self.precision_plugin.__dict__.pop("clip_gradients", None)
        self._hand_clip.uninstall()
        if module is not None:
            remove_count_reduction(module)  # the model may outlive the process group
        if module is not None and self._checkpoint == "full" and healthy and dist.is_initialized():
            layout = self._layout()
            if layout.shards and fitting:
                # Optimizers still hold per-rank expert states: remember how, for a save after fit. Only
                # fit's teardown: a later stage shards the model into new parameters the optimizers never saw.
                self._released_layouts = {
                    id(_unwrap(o)): OptimizerLayout(_unwrap(o), module, layout) for o in self.optimizers
                }
            # Give the caller (and the spawn launcher, which copies rank 0's weights) the whole model.
            for _, layer in find_moe_layers(module):
                unshard_moe_layer(layer)
        super().teardown()

    @override
    def on_predict_start(self) -> None:
        super().on_predict_start()
        if not self._layout().shards or self._trainer is None:
            return
        # Every expert-parallel batch is a collective of the expert group, and Lightning's predict sampler
        # does not pad ranks to equal lengths: a rank with more batches would wait forever in its last ones.
        batches = torch.tensor(float(sum(self._trainer.num_predict_batches)), device=self.root_device)
        counts = [int(c) if c != float("inf") else c for c in self.all_gather(batches).reshape(-1).tolist()]
        if len(set(counts)) > 1:
            raise ValueError(f"{type(self).__name__}: predict got {counts} batches on ranks 0.. (in rank order); "
                             "under expert parallelism every batch is an exchange between the ranks, so each rank "
                             "must predict the same number of batches: pad the dataset to a multiple of "
                             "world_size * batch_size or give every rank an equal-length dataloader")

    def _layout(self) -> ShardLayout:
        module = self.lightning_module
        return ShardLayout([s for _, layer in find_moe_layers(module) if (s := expert_shard(layer)) is not None])

    # ------------------------------------------------------------------------------------------
    # Gradients

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        module = self.lightning_module
        if module is not None and not module.automatic_optimization:
            # manual_backward may run several times a step: reduce once, before the clip or the step.
            self._pending_grads.mark(expert_parameters(module))
            return
        if isinstance(self.model, DistributedDataParallel) and not self.model.require_backward_grad_sync:
            return  # accumulating: DDP does not sync this micro-batch either
        self.reduce_expert_gradients()

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        self._reduce_pending(optimizer)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def _clip_gradients(self, optimizer: Optimizer, clip_val: float = 0.0, gradient_clip_algorithm: Any = None) -> None:
        # Installed on the precision plugin: LightningModule.clip_gradients under manual optimization
        # must clip reduced expert gradients.
        self._reduce_pending(optimizer)
        plugin = self.precision_plugin
        args = (clip_val,) if gradient_clip_algorithm is None else (clip_val, gradient_clip_algorithm)
        type(plugin).clip_gradients(plugin, optimizer, *args)

    def _reduce_pending(self, optimizer: Optimizer) -> None:
        self._reduce_pending_of([p for group in _unwrap(optimizer).param_groups for p in group["params"]])

    def _reduce_pending_of(self, params: list[Tensor]) -> None:
        module = self.lightning_module
        assert module is not None
        held = {id(p) for p in params}
        pending = self._pending_grads.take([p for p in expert_parameters(module) if id(p) in held])
        if pending:
            self.reduce_expert_gradients(pending)

    def _on_hand_clip(self, params: list[Tensor]) -> None:
        # torch.nn.utils.clip_grad_norm_ called while set up (by the user, or by Lightning at ep=1).
        module = self.lightning_module
        if module is None or not any(id(p) in {id(q) for q in params} for p in expert_parameters(module)):
            return
        self._reduce_pending_of(params)  # manual optimization: clip reduced gradients
        if self._layout().shards and not self._warned_hand_clip:
            self._warned_hand_clip = True
            rank_zero_warn(f"{type(self).__name__}: torch.nn.utils.clip_grad_norm_ called by hand sees only this "
                           "rank's experts, so each rank scales its gradients by another factor and the dense "
                           "replicas drift apart. Clip with Trainer(gradient_clip_val=..., "
                           "gradient_clip_algorithm='norm') (or self.clip_gradients(...) under manual "
                           "optimization): the strategy then clips by the norm of the whole model.")

    def reduce_expert_gradients(self, params: list[Tensor] | None = None) -> None:
        """Turn each rank's expert gradients into those of single-process training on the global batch.

        After backward, a rank's expert gradient is the sum over the ranks of its expert group
        (the all-to-all's backward brings every token's contribution home), while DDP averages dense
        gradients over all ranks. Summing over the ranks holding the same experts and dividing by the
        world size gives ``d(mean of the per-rank losses)/dW``, as for dense parameters. Runs after
        the last backward of an optimizer step, before gradient clipping and the step
        (:func:`lightning_moe.distributed.gradients.reduce_expert_gradients`).

        Args:
            params: the expert parameters to reduce (default: every trainable one); the same on every rank.
        """
        module = self.lightning_module
        assert module is not None
        params = [p for p in (expert_parameters(module) if params is None else params) if p.requires_grad]
        if not params or self.world_size == 1:
            return
        gradients.reduce_expert_gradients(params, self.expert_data_group, self.world_size, self.root_device)
        if getattr(self.precision_plugin, "scaler", None) is not None:
            self._agree_on_nonfinite([p for p in params if p.grad is not None])

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        """``clip_grad_norm_`` over the logical model: the 2-norm of every gradient, experts of all ranks included.

        Installed on the precision plugin when experts are sharded (Lightning's ``gradient_clip_val``
        with ``gradient_clip_algorithm="norm"``). Dense gradients are identical on every rank after DDP;
        expert gradients are summed over the expert group, which holds each expert exactly once
        (:func:`lightning_moe.distributed.gradients.clip_grad_norm`).
        """
        gradients.clip_grad_norm(self.precision_plugin.main_params(optimizer), expert_parameters(self.lightning_module),
                                 clip_val, self.expert_group, self.root_device)

    def _agree_on_nonfinite(self, params: list[Tensor]) -> None:
        # A GradScaler skips the step when it sees inf/NaN; expert gradients differ between expert
        # groups, so make every rank see non-finite values when any rank has them.
        module = self.lightning_module
        gradients.agree_on_nonfinite(params, self.root_device, module.parameters() if module is not None else ())

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def _gather_args(self) -> tuple[dist.ProcessGroup, bool, bool]:
        # The expert group holding global rank 0 gathers to it; other groups keep their shards.
        group = self.expert_group
        return group, self.global_rank < self.expert_parallel_size, self.global_rank == 0

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
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
        optimizer = _unwrap(optimizer)
        layout = self._layout()
        if self._checkpoint == "sharded":
            olayout = OptimizerLayout(optimizer, self.lightning_module, layout)
            return sharded_checkpoint.sharded_optimizer_state(optimizer, olayout, self._device_mesh)
        if id(optimizer) in self._released_layouts:  # saved after fit: the optimizer holds fit's expert shards
            olayout = self._released_layouts[id(optimizer)]
        elif layout.shards:
            olayout = OptimizerLayout(optimizer, self.lightning_module, layout)
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
        if not sharded_checkpoint.is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        module = self.lightning_module
        self._shrink_to_saved(sharded_checkpoint.saved_model_shapes(path))
        layout = self._layout()
        olayouts = [OptimizerLayout(_unwrap(o), module, layout) for o in self.optimizers]
        return sharded_checkpoint.load_sharded(path, module.state_dict(), olayouts, layout, self._device_mesh,
                                               weights_only)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        self._shrink_to_saved({k: v.shape for k, v in checkpoint["state_dict"].items() if isinstance(v, Tensor)})
        state = local_model_state(checkpoint["state_dict"], module.state_dict(), self._layout())
        module.load_state_dict(state, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        layout = self._layout()
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer = _unwrap(optimizer)
            olayout = OptimizerLayout(optimizer, self.lightning_module, layout)
            optimizer.load_state_dict(local_optimizer_state(saved, olayout))
            _compat.optimizer_to_device(optimizer, self.root_device)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("moe", "popen"), ("moe_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"Expert-parallel MoE strategy with start_method={start_method!r}",
                    start_method=start_method,
                )


def _unwrap(optimizer: Optimizer) -> Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


MoEStrategy.register_strategies(StrategyRegistry)
