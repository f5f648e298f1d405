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
  torch.distributed.checkpoint directory (``checkpoint="sharded"``), and reshard on resume
  (:mod:`lightning_moe.distributed.strategy_checkpoints`).

``data_parallel="fsdp"`` (``Trainer(strategy="moe_fsdp")``) shards instead of replicating, with torch's FSDP2
(:mod:`lightning_moe.distributed.fsdp`): dense parameters over every rank, each expert bank over the ranks
holding the same experts; models built on the meta device are materialised shard by shard
(:mod:`lightning_moe.distributed.materialise`), and checkpoints are DCP directories that reshard on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_moe import _compat
from lightning_moe.distributed import fake, fsdp, gradients
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
from lightning_moe.distributed.materialise import has_meta_tensors, materialise
from lightning_moe.distributed.shard_layout import OptimizerLayout, ShardLayout
from lightning_moe.distributed.sharded_checkpoint import consolidate_checkpoint
from lightning_moe.distributed.strategy_checkpoints import StrategyCheckpoints, unwrap_optimizer
from lightning_moe.nn.moe import find_moe_layers

CHECKPOINT_FORMATS = ("full", "sharded")
DATA_PARALLEL = ("ddp", "fsdp")
_SHARDED_BY_US = "_lightning_moe_fsdp"  # set on a LightningModule once shard_model ran on it

__all__ = ["MoEStrategy", "consolidate_checkpoint"]


def _override_method(obj: object, name: str, method: Callable[..., Any]) -> None:
    """Shadow ``obj``'s method ``name`` with ``method`` on this instance only; ``vars(obj).pop(name)`` undoes it."""
    setattr(obj, name, method)


class MoEStrategy(StrategyCheckpoints):
    """DDP or FSDP2 for dense parameters plus expert parallelism for :class:`~lightning_moe.MoE` layers.

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each holds
            ``num_experts / expert_parallel_size`` of every layer). Default: the world size. Must
            divide the world size and every layer's ``num_experts``.
        data_parallel: ``"ddp"`` (default) replicates dense parameters and all-reduces their gradients;
            ``"fsdp"`` shards them over every rank with FSDP2 and shards each expert bank over the ranks holding
            the same experts (``Trainer(strategy="moe_fsdp")``): nothing is whole on any rank, a model built on the
            meta device (``configure_model`` runs under it) is materialised shard by shard, and the model stays
            sharded between stages.
        checkpoint: ``"full"`` writes one file with the full logical model, gathered to rank 0 (it
            loads with ``Model.load_from_checkpoint`` in a plain process), and gives the model back
            unsharded after ``fit``/``validate``/...; ``"sharded"`` writes a
            torch.distributed.checkpoint directory (each rank its shards) and leaves the model
            sharded, for models that do not fit one host. Default: ``"full"`` with ``"ddp"``, ``"sharded"``
            with ``"fsdp"`` (the only format there; ``consolidate_checkpoint`` makes a full file offline).
        **ddp_kwargs: arguments of Lightning's ``DDPStrategy`` (``start_method``, ``timeout``,
            ``process_group_backend``, ...) and, with ``"ddp"``, of ``DistributedDataParallel``.

    Raises:
        ValueError: for a bad ``expert_parallel_size``, ``data_parallel`` or ``checkpoint``; before training, when
            the world size or a layer's ``num_experts`` is not a multiple of ``expert_parallel_size``.

    Example::

        trainer = L.Trainer(accelerator="gpu", devices=8, strategy="moe")             # EP = 8
        trainer = L.Trainer(devices=8, num_nodes=2, strategy=MoEStrategy(expert_parallel_size=8))
        trainer = L.Trainer(devices=8, num_nodes=4, strategy=MoEStrategy(expert_parallel_size=8,
                                                                         data_parallel="fsdp"))
    """

    strategy_name = "moe"

    def __init__(self, expert_parallel_size: int | None = None, checkpoint: str | None = None,
                 data_parallel: str = "ddp", **ddp_kwargs: Any) -> None:
        name = type(self).__name__
        if expert_parallel_size is not None and (
            not isinstance(expert_parallel_size, int) or isinstance(expert_parallel_size, bool)
            or expert_parallel_size < 1
        ):
            raise ValueError(f"{name}: expert_parallel_size={expert_parallel_size!r} must be a positive int, or None "
                             "for the world size")
        if data_parallel not in DATA_PARALLEL:
            raise ValueError(f"{name}: data_parallel={data_parallel!r} must be one of {DATA_PARALLEL}")
        if checkpoint is None:
            checkpoint = "sharded" if data_parallel == "fsdp" else "full"
        if checkpoint not in CHECKPOINT_FORMATS:
            raise ValueError(f"{name}: checkpoint={checkpoint!r} must be one of {CHECKPOINT_FORMATS}")
        if data_parallel == "fsdp" and checkpoint != "sharded":
            raise ValueError(f"{name}: data_parallel='fsdp' writes DCP directories only, checkpoint={checkpoint!r} "
                             "given; use checkpoint='sharded' (the default) and make a full file offline with "
                             "lightning_moe.strategy.consolidate_checkpoint")
        if checkpoint == "sharded" and ddp_kwargs.get("start_method", "popen") != "popen":
            raise ValueError(f"{name}: checkpoint='sharded' keeps the model sharded after fit, which start_method="
                             f"{ddp_kwargs['start_method']!r} cannot copy back to the main process; use "
                             "checkpoint='full' or the default start_method='popen'")
        super().__init__(**ddp_kwargs)
        self._expert_parallel_size = expert_parallel_size
        self._data_parallel = data_parallel
        self._checkpoint = checkpoint
        self._device_mesh = None
        self._world_mesh = None
        self._trainer: pl.Trainer | None = None
        self._released_layouts: dict[int, OptimizerLayout] = {}
        self._pending_grads = gradients.PendingReduction()  # manual optimization: reduced at the step
        self._hand_clip = gradients.HandClipWatch(self._on_hand_clip)
        self._warned_hand_clip = False

    @property
    def data_parallel(self) -> str:
        """``"ddp"`` or ``"fsdp"``: how dense parameters are spread over the ranks."""
        return self._data_parallel

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
        on_meta = has_meta_tensors(module)
        fsdp_mode = self._data_parallel == "fsdp"
        first = not getattr(module, _SHARDED_BY_US, False)
        if fsdp_mode and first and ep > 1 and any(fsdp.is_sharded(layer.experts) or any(
                fsdp.is_dtensor(p) for p in layer.experts.parameters()) for _, layer in layers):
            raise ValueError(f"{type(self).__name__}: the experts of an MoE layer are already in your own fully_shard "
                             f"unit; with expert_parallel_size={ep} leave MoE expert banks out of it (the strategy "
                             "shards them over the ranks holding the same experts)")
        if fsdp_mode and first and not on_meta and world > 1:
            self._broadcast(module)  # FSDP2 does not: ranks start from rank 0's model, as with DDP
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
            if not on_meta and not fsdp_mode:
                self._broadcast(layer.experts)  # seeded meta init needs none: every rank draws its own experts
            if ep > 1:
                shard = shard_moe_layer(layer, path, mesh.get_local_rank("expert"), ep, self.expert_group)
                if fake.is_fake_backend():  # a dry run: the fake all-to-all returns no counts, mirror ours
                    layer.expert_dispatcher = fake.FakeBackendDispatcher(shard, self.expert_group)
        self._install_count_reduction()
        if fsdp_mode:
            self._setup_fsdp(trainer, on_meta and first)
            return
        if on_meta:
            materialise(module, self._init_seed(), self.root_device)
        ignored = set(_compat.ddp_ignored_names(module)) | set(expert_state_names(module))
        _compat.set_ddp_ignored_names(module, sorted(ignored))
        if ep > 1:
            # Norm clipping must see the norm of the whole model, experts of every rank included.
            _override_method(self.precision_plugin, "clip_grad_by_norm", self.clip_grad_by_norm)
        self._pending_grads.clear()
        # manual optimization: reduce, then clip
        _override_method(self.precision_plugin, "clip_gradients", self._clip_gradients)
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

    def _install_count_reduction(self) -> None:
        """Balancing losses of scope "global"/"sequence" sum their routing counts over the whole world.

        Every rank trains on a different part of the batch (data x expert dims), so the sum spans the
        default group; the layers know no group (see :mod:`lightning_moe.nn.reduce`). Removed in teardown.
        """
        module = self.lightning_module
        if module is not None and self.world_size > 1:
            install_count_reduction(module, dist.group.WORLD)

    def _setup_fsdp(self, trainer: pl.Trainer, materialise_now: bool) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        if not getattr(module, _SHARDED_BY_US, False):
            self.precision_plugin.convert_module(module)  # before sharding: RouterPrecision keeps routers float32
            fsdp.shard_model(module, self.world_mesh, self.device_mesh["data"])
            setattr(module, _SHARDED_BY_US, True)
            if fake.is_fake_backend():  # a dry run: all-gather buffers written, as a real backend writes them
                for unit in module.modules():
                    if fsdp.is_sharded(unit):
                        # torch annotates the argument with its private AllGather ABC (no public name);
                        # WrittenAllGather implements that interface (allocate, __call__).
                        unit.set_custom_all_gather(fake.WrittenAllGather())  # type: ignore[arg-type]
            if materialise_now:
                materialise(module, self._init_seed(), self.root_device)
        self.model = module
        _override_method(self.precision_plugin, "clip_grad_by_norm", self.clip_grad_by_norm)
        if trainer.state.fn == TrainerFn.FITTING:
            _compat.reset_optimizers(self)  # a new fit makes new optimizers over the same shards
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _init_seed(self) -> int:
        # Every rank materialises with rank 0's seed (seed_everything makes it the same anyway).
        return int(self.broadcast(torch.initial_seed() % (1 << 62)))

    def _broadcast(self, module) -> None:
        # DDP broadcasts rank 0's dense weights; experts are outside DDP (and FSDP2 broadcasts nothing).
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                full = tensor.detach().to(self.root_device)
                dist.broadcast(full, src=0)
                tensor.copy_(full)

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if self._data_parallel == "fsdp":
            # The model stays sharded (no gather, no move to CPU): a later stage or save uses the shards.
            self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)
            if module is not None:
                remove_count_reduction(module)
                fsdp.reshard(module)
            assert self.cluster_environment is not None and self.accelerator is not None
            self.cluster_environment.teardown()
            self.precision_plugin.teardown()
            self.accelerator.teardown()
            self.checkpoint_io.teardown()
            return
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
                optimizers = [unwrap_optimizer(o) for o in self.optimizers]
                self._released_layouts = {id(o): OptimizerLayout(o, module, layout) for o in optimizers}
            # Give the caller (and the spawn launcher, which copies rank 0's weights) the whole model.
            for _, layer in find_moe_layers(module):
                unshard_moe_layer(layer)
        super().teardown()

    @override
    def on_predict_start(self) -> None:
        super().on_predict_start()
        if (not self._layout().shards and self._data_parallel != "fsdp") or self._trainer is None:
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
        assert module is not None  # a layout is asked for only once a module is attached
        return ShardLayout([s for _, layer in find_moe_layers(module) if (s := expert_shard(layer)) is not None])

    # ------------------------------------------------------------------------------------------
    # Gradients

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self._data_parallel == "fsdp":
            return  # FSDP reduce-scatters expert gradients itself (sum over data / world, see shard_model)
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
        self._reduce_pending_of([p for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]])

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
        (:func:`lightning_moe.distributed.gradients.clip_grad_norm`). With ``data_parallel="fsdp"`` every element
        of every gradient lives on one rank: one all-reduce of local squared norms
        (:func:`lightning_moe.distributed.fsdp.clip_grad_norm_`).
        """
        if self._data_parallel == "fsdp":
            fsdp.clip_grad_norm_(self.precision_plugin.main_params(optimizer), clip_val, self.root_device)
            return
        module = self.lightning_module
        assert module is not None  # clipping runs inside a fit
        gradients.clip_grad_norm(self.precision_plugin.main_params(optimizer), expert_parameters(module),
                                 clip_val, self.expert_group, self.root_device)

    def _agree_on_nonfinite(self, params: list[Tensor]) -> None:
        # A GradScaler skips the step when it sees inf/NaN; expert gradients differ between expert
        # groups, so make every rank see non-finite values when any rank has them.
        module = self.lightning_module
        gradients.agree_on_nonfinite(params, self.root_device, module.parameters() if module is not None else ())

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("moe", "popen"), ("moe_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"Expert-parallel MoE strategy with start_method={start_method!r}",
                    start_method=start_method,
                )
        if "moe_fsdp" not in strategy_registry:
            strategy_registry.register("moe_fsdp", cls, description="Expert parallelism with FSDP2 for everything else",
                                       data_parallel="fsdp")


MoEStrategy.register_strategies(StrategyRegistry)
