"""FSDP2 for models with MoE layers: two meshes, one world (as torchtitan does it).

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to a model whose MoE layers already hold only
this rank's experts (:func:`~lightning_moe.distributed.shard_moe_layer`):

1. every MoE layer's expert bank is one unit over the ``data`` mesh dimension (the ranks holding the same
   experts), its stacked weights ``[L, D, H]`` sharded on dim 1 (or 2: :func:`expert_shard_dim`), so that fewer
   local experts than data ranks needs no padding; its gradients are divided by the *world* size: the
   all-to-all's backward already summed every token's contribution over the expert group, so sum over ``data``
   / world = single-process gradients;
2. each repeated block holding an MoE layer (found without user code, see :func:`find_blocks`), and the dense
   blocks beside it, is one unit over all ranks; so is the root (embeddings, head, everything left), dim 0
   sharded (dim 1 for a stacked shared expert ``[1, D, H]``: :func:`dense_shard_dim`);
3. FSDP2 wants one dtype per unit: where a unit mixes dtypes (float32 routers in a ``bf16-true`` model,
   :class:`~lightning_moe.callbacks.RouterPrecision`), the largest submodules of the minority dtype become
   units of their own.

Modules the user already passed to ``fully_shard`` (in ``configure_model``) are left as they are. Each element of
every logical tensor then lives on exactly one rank, which :func:`clip_grad_norm_` uses: one all-reduce of the
local squared norms gives the norm of the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe.nn.experts import GroupedExperts
from lightning_moe.nn.moe import find_moe_layers

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

# Methods of a LightningModule that run a forward: FSDP unshards the root's parameters around them.
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")

__all__ = ["clip_grad_norm_", "dense_shard_dim", "expert_shard_dim", "find_blocks", "is_dtensor", "is_sharded",
           "reshard", "shard_model"]


def _fsdp():
    import torch.distributed.fsdp as fsdp

    return fsdp


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> TypeGuard[FSDPModule]:
    """Whether ``fully_shard`` was applied to ``module`` (it is an ``FSDPModule``)."""
    return isinstance(module, _fsdp().FSDPModule)


def find_blocks(module: nn.Module) -> list[str]:
    """Module paths of the repeated blocks that hold MoE layers, and the blocks beside them.

    For each MoE layer, its block is the child of its nearest ``nn.ModuleList``/``nn.Sequential`` ancestor
    (``blocks.3`` for ``blocks.3.ffn``); every other child of that container is a block too (dense-FFN blocks).
    An MoE layer with no such ancestor is a block by itself.

    Example:
        >>> from lightning_moe.models import Transformer
        >>> from lightning_moe.plan import Architecture
        >>> arch = Architecture(layers=3, dim=8, heads=2, vocab=16, expert_hidden=8, experts=4, top_k=2,
        ...                     dense_layers=1, ffn_hidden=16)
        >>> find_blocks(Transformer(arch, device="meta"))
        ['blocks.0', 'blocks.1', 'blocks.2']
    """
    modules = dict(module.named_modules())
    blocks: dict[str, None] = {}
    for path, _ in find_moe_layers(module):
        parts = path.split(".") if path else []
        for k in range(len(parts) - 1, -1, -1):
            container = ".".join(parts[:k])
            if isinstance(modules[container], (nn.ModuleList, nn.Sequential)):
                prefix = f"{container}." if container else ""
                for child, _ in modules[container].named_children():
                    blocks[prefix + child] = None
                break
        else:
            blocks[path] = None
    return list(blocks)


def _unmanaged(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters of ``module`` not yet in an FSDP unit (still plain tensors)."""
    return [(n, p) for n, p in module.named_parameters() if not is_dtensor(p)]


def _split_dtypes(unit: nn.Module, mesh, name: str, **kwargs) -> None:
    """Give the largest submodules of ``unit`` whose parameters are of a minority dtype their own FSDP units."""
    params = _unmanaged(unit)
    numel: dict[torch.dtype, int] = {}
    for _, p in params:
        numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
    if len(numel) <= 1:
        return
    majority = max(numel, key=lambda d: numel[d])
    chosen: list[str] = []
    for path, sub in unit.named_modules():
        if not path or any(path.startswith(c + ".") for c in chosen):
            continue
        dtypes = {p.dtype for _, p in _unmanaged(sub)}
        if len(dtypes) == 1 and majority not in dtypes:
            _fsdp().fully_shard(sub, mesh=mesh, **kwargs)
            chosen.append(path)
    left = {p.dtype for _, p in _unmanaged(unit)}
    if len(left) > 1:
        mixed = sorted(n for n, p in _unmanaged(unit) if p.dtype != majority)[:3]
        raise ValueError(f"shard_model: {name or '<root>'!r} holds parameters of dtypes {sorted(map(str, left))} "
                         f"directly (e.g. {mixed}) and FSDP2 shards one dtype per unit; move them into a submodule "
                         "or give them the module's dtype")


def expert_shard_dim(shape: tuple[int, ...], dp: int) -> int | None:
    """The dim FSDP2 shards a stacked expert tensor ``[L, ...]`` on over ``dp`` ranks: the first dim after the
    expert dim that ``dp`` divides (FSDP2 shards a non-zero dim evenly only), None when there is none."""
    return next((d for d in range(1, len(shape)) if shape[d] % dp == 0), None)


def _expert_placement(param: nn.Parameter, dp: int, path: str):
    from torch.distributed.tensor import Shard

    dim = expert_shard_dim(tuple(param.shape), dp)
    if dim is None:
        raise ValueError(f"shard_model: expert weight {path!r} of shape {tuple(param.shape)} has no dim after the "
                         f"expert dim divisible by the data-parallel size {dp} (FSDP2 shards a non-zero dim evenly); "
                         "pick a model width or expert hidden size divisible by world_size / expert_parallel_size, "
                         "or another expert_parallel_size")
    return Shard(dim)


def dense_shard_dim(shape: tuple[int, ...], world: int) -> int:
    """The dim FSDP2 shards a non-expert tensor on: 0, or 1 when dim 0 has fewer rows than ranks and dim 1 divides
    evenly (a stacked shared expert ``[1, D, H]`` would otherwise sit on rank 0 alone)."""
    return 1 if len(shape) > 1 and shape[0] < world and shape[1] % world == 0 else 0


def shard_model(module: nn.Module, world_mesh, data_mesh, reshard_after_forward: bool = True) -> list[str]:
    """Apply FSDP2 to ``module`` (experts over ``data_mesh``, everything else over ``world_mesh``); in place.

    Works on the meta device (then :func:`~lightning_moe.distributed.materialise.materialise` allocates the
    shards) and on real tensors (which must then hold the same values on every rank).

    Args:
        module: The root (a LightningModule), its MoE layers already expert-sharded.
        world_mesh: 1-D mesh of every rank (dense parameters).
        data_mesh: 1-D mesh of the ranks holding the same experts.
        reshard_after_forward: Free each block's unsharded parameters after its forward (ZeRO-3) or keep them
            for the backward (ZeRO-2).

    Returns:
        The module paths of the units created (``""`` for the root), innermost first.

    Raises:
        ValueError: If an expert dim does not divide by the data size, if the user's own ``fully_shard`` already
            took the experts of an expert-sharded layer, or if a unit holds parameters of two dtypes directly.
    """
    from torch.distributed.tensor import Shard

    fsdp = _fsdp()
    world = world_mesh.size()
    dp = data_mesh.size()
    kwargs = {"reshard_after_forward": reshard_after_forward}
    dense = {"shard_placement_fn": lambda p: Shard(dense_shard_dim(tuple(p.shape), world)), **kwargs}
    units: list[str] = []
    for path, layer in find_moe_layers(module):
        bank: Any = layer.experts
        prefix = f"{path}.experts" if path else "experts"
        if is_sharded(bank) or any(is_dtensor(p) for p in bank.parameters()):
            if layer.expert_dispatcher is not None:
                raise ValueError(f"shard_model: the experts of {path!r} are already in an FSDP unit over another mesh; "
                                 "leave MoE expert banks out of your own fully_shard calls (the strategy shards them "
                                 "over the ranks holding the same experts)")
            continue
        placement = None
        if isinstance(bank, GroupedExperts):
            shard_dims = {id(p): _expert_placement(p, dp, f"{prefix}.{n}") for n, p in bank.named_parameters()}
            placement = lambda p, dims=shard_dims: dims[id(p)]  # noqa: E731
        fsdp.fully_shard(bank, mesh=data_mesh, shard_placement_fn=placement, **kwargs)
        # Expert gradients: the all-to-all's backward summed over the expert group; sum over data / world.
        bank.set_gradient_divide_factor(float(world))
        if dp > 1 and dist.get_backend(data_mesh.get_group()) != "nccl":
            # gloo has no PREMUL_SUM. NOTE: not at dp == 1, where torch 2.13 would then divide twice.
            bank.set_force_sum_reduction_for_comms(True)
        bank.set_reduce_scatter_unused_params(True)
        units.append(prefix)
    submodules = dict(module.named_modules())
    for path in find_blocks(module):
        block = submodules[path]
        if is_sharded(block) or not _unmanaged(block):
            continue
        _split_dtypes(block, world_mesh, path, **dense)
        fsdp.fully_shard(block, mesh=world_mesh, **dense)
        units.append(path)
    if not is_sharded(module):
        _split_dtypes(module, world_mesh, "", **dense)
        fsdp.fully_shard(module, mesh=world_mesh, **dense)
        units.append("")
    _register_step_methods(module)
    return units


def _register_step_methods(module: nn.Module) -> None:
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not isinstance(module, LightningModule):
        return
    for name in STEP_METHODS:
        if is_overridden(name, module) and name not in vars(module):  # registering sets an instance attribute
            _fsdp().register_fsdp_forward_method(module, name)


def reshard(module: nn.Module) -> None:
    """Free every unit's unsharded parameters (the root keeps them after a forward without backward)."""
    for sub in module.modules():
        if is_sharded(sub):
            sub.reshard()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float, device: torch.device) -> Tensor:
    """``clip_grad_norm_`` of a model sharded over every rank: each element of each gradient counted once.

    Sums the squared norms of the local shards (a ``DTensor``'s replicated mesh dims divide its share, a plain
    tensor counts once, as if replicated everywhere), all-reduces over the world, and scales every local
    gradient by ``min(1, max_norm / (norm + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does. A collective:
    every rank calls it, whatever it holds.

    Returns:
        The total norm before clipping.
    """
    from torch.distributed.tensor import Replicate

    sharded = torch.zeros(1, device=device)
    replicated = torch.zeros((), device=device)
    grads = []
    for p in params:
        g: Any = p.grad
        if g is None:
            continue
        grads.append(g)
        if is_dtensor(g):
            copies = 1
            for dim, placement in enumerate(g.placements):
                if isinstance(placement, Replicate):
                    copies *= g.device_mesh.size(dim)
            sharded += torch.linalg.vector_norm(g.to_local().float()).square().to(device) / copies
        else:
            replicated += torch.linalg.vector_norm(g.float()).square().to(device)
    dist.all_reduce(sharded)
    total = (sharded[0] + replicated).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = g.to_local() if is_dtensor(g) else g
        local.mul_(coef.to(local.dtype))
    return total
