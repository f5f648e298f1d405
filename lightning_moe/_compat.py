"""Every private (underscore) name of torch and Lightning that lightning-moe relies on, in one place.

Private names change without deprecation. Each one we use is imported or named here only, listed in
:data:`PRIVATE_NAMES` with the version it was checked against and what breaks without it, and
``tests/test_compat.py`` resolves every entry: an upstream rename fails a test loudly instead of
silently disabling, say, the peer watchdog or upcycle's bypass of torch's fused encoder kernel.

Modules of the package import the aliases below (``from lightning_moe import _compat``), never the
private names themselves. When upgrading torch or Lightning, run ``tests/test_compat.py`` first and
update the ``checked`` versions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol  # noqa: F401 (re-exported)
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.trainer import Trainer
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

TORCH_CHECKED = "2.13.0"
LIGHTNING_CHECKED = "2.6.6"


@dataclass(frozen=True)
class PrivateName:
    """One private name of torch or Lightning that the package uses.

    Attributes:
        module: the importable module that holds it.
        qualname: attribute path inside ``module`` (``"DDPStrategy._configure_launcher"``).
        checked: ``"<package> <version>"`` it was last checked against.
        used_by: where we use it and what breaks when it is renamed.
    """

    module: str
    qualname: str
    checked: str
    used_by: str


_TORCH = f"torch {TORCH_CHECKED}"
_LIGHTNING = f"lightning {LIGHTNING_CHECKED}"

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # torch
    PrivateName("torch._utils", "_flatten_dense_tensors", _TORCH,
                "distributed/gradients.py: expert gradients all-reduced in flat buckets"),
    PrivateName("torch._utils", "_unflatten_dense_tensors", _TORCH,
                "distributed/gradients.py: expert gradients all-reduced in flat buckets"),
    PrivateName("torch.nn.parallel", "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model", _TORCH,
                "strategy.py: expert weights and routing stats kept out of DDP"),
    PrivateName("torch.distributed._functional_collectives", "all_to_all_single_autograd", _TORCH,
                "distributed/all_to_all.py: the differentiable token exchange of expert parallelism"),
    PrivateName("torch.distributed._functional_collectives", "wait_tensor", _TORCH,
                "distributed/all_to_all.py: waits for the token exchange"),
    PrivateName("torch.distributed._functional_collectives", "all_reduce", _TORCH,
                "distributed/count_reduction.py: the asynchronous count sum of the global balancing loss"),
    PrivateName("torch", "_grouped_mm", _TORCH,
                "nn/experts.py: the grouped GEMM of GroupedExperts (CUDA bf16; CPU for small experts)"),
    PrivateName("torch._C._autograd", "_make_saved_tensor", _TORCH,
                "nn/ops/grouped_mlp.py: per-expert saved activations that go through saved_tensors_hooks "
                "(checkpointing, offloading) and are freed expert by expert in the fused backward"),
    PrivateName("torch.nn.modules.module", "_global_forward_pre_hooks", _TORCH,
                "nn/experts.py: has_forward_hooks (with a module's own _forward_pre_hooks/_forward_hooks): the "
                "overlapped expert-parallel path reads the weights outside a module call only without hooks"),
    PrivateName("torch.nn.modules.module", "_global_forward_hooks", _TORCH, "nn/experts.py: has_forward_hooks"),
    PrivateName("torch", "_weight_int8pack_mm", _TORCH,
                "compress.py: QuantizedGroupedExperts(kernel='int8_mm')"),
    PrivateName("torch.nn", "TransformerEncoderLayer._ff_block", _TORCH,
                "upcycle.py: the encoder layer's feed-forward block, overridden to call the MoE"),
    PrivateName("torch.nn", "TransformerDecoderLayer._ff_block", _TORCH,
                "upcycle.py: the decoder layer's feed-forward block, overridden to call the MoE"),
    PrivateName("torch", "_transformer_encoder_layer_fwd", _TORCH,
                "upcycle.py: the fused encoder kernel that reads linear1/linear2 directly; "
                "disable_fused_encoder_fast_path keeps upcycled layers away from it"),
    PrivateName("torch.testing._internal.distributed.fake_pg", "FakeStore", _TORCH,
                "distributed/fake.py: torch's fake process group, one rank of a 10,000-rank job in one process "
                "(examples/trillion_plan.py; what torchtitan's dry runs use)"),
    # Lightning
    PrivateName("lightning.pytorch.strategies", "DDPStrategy._reset_optimizers_and_schedulers", _LIGHTNING,
                "strategy.py: a new fit of an FSDP-sharded model makes new optimizers over the same shards"),
    PrivateName("lightning.pytorch.strategies.launchers", "_SubprocessScriptLauncher", _LIGHTNING,
                "distributed/launcher.py: the popen launcher the peer watchdog extends"),
    PrivateName("lightning.pytorch.strategies.launchers", "_SubprocessScriptLauncher._call_children_scripts",
                _LIGHTNING, "distributed/launcher.py: tells the started ranks the launcher's pid (peer watchdog)"),
    PrivateName("lightning.pytorch.strategies", "DDPStrategy._configure_launcher", _LIGHTNING,
                "distributed/strategy_meshes.py: installs the watched launcher (peer watchdog)"),
    PrivateName("lightning.fabric.utilities.optimizer", "_optimizer_to_device", _LIGHTNING,
                "strategy.py: optimizer state moved to the device after a sharded load"),
    PrivateName("lightning.fabric.utilities.types", "_PATH", _LIGHTNING,
                "strategy.py: checkpoint path type of Strategy.save_checkpoint/load_checkpoint"),
    PrivateName("lightning.pytorch.trainer.trainer", "Trainer._run", _LIGHTNING,
                "strategy.py: the weights_only a user gave fit/validate/test/predict, which Trainer._run does "
                "not pass on to strategies that restore after setup (running_weights_only)"),
)

# -- torch ------------------------------------------------------------------------------------------

flatten_dense_tensors = _flatten_dense_tensors
unflatten_dense_tensors = _unflatten_dense_tensors
# The CUDA grouped GEMM; None when this build lacks it (callers then take their per-expert loop).
grouped_mm: Callable[..., torch.Tensor] | None = getattr(torch, "_grouped_mm", None)


def make_saved_tensor(tensor: torch.Tensor) -> Any:
    """Save ``tensor`` for a backward as autograd does (the active ``saved_tensors_hooks`` pack it).

    ``.unpack()`` on the result gives it back through the matching unpack hook; dropping the result frees it.
    torch.utils.checkpoint saves its inputs the same way.
    """
    return torch._C._autograd._make_saved_tensor(tensor, is_output=False)


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether a call of ``module`` runs forward (pre-)hooks: its own or global ones (FSDP2's unsharding,
    torch.nn.utils.prune's masks). Code that reads a module's weights without calling it must then call it."""
    from torch.nn.modules import module as _module

    return bool(module._forward_pre_hooks or module._forward_hooks or _module._global_forward_pre_hooks
                or _module._global_forward_hooks)


# int8 weight x float activation GEMM; None when this build lacks it.
weight_int8pack_mm: Callable[..., torch.Tensor] | None = getattr(torch, "_weight_int8pack_mm", None)
# The feed-forward method of nn.TransformerEncoderLayer / nn.TransformerDecoderLayer that upcycle overrides.
FF_BLOCK = "_ff_block"
# nn.TransformerEncoderLayer.forward takes the fused kernel (torch._transformer_encoder_layer_fwd, which
# reads linear1/linear2 and so bypasses ``_ff_block``) only while this attribute is truthy.
_FUSED_KERNEL_FLAG = "activation_relu_or_gelu"
# Attribute DistributedDataParallel reads on the wrapped module: names it must neither broadcast nor reduce.
_DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"


def disable_fused_encoder_fast_path(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> None:
    """Make ``layer`` never eligible for torch's fused encoder kernel (checked first by ``forward``)."""
    setattr(layer, _FUSED_KERNEL_FLAG, 0)


def ddp_ignored_names(module: nn.Module) -> tuple[str, ...]:
    """Parameter and buffer names ``module`` already asks DistributedDataParallel to ignore."""
    return tuple(getattr(module, _DDP_IGNORE_ATTR, ()))


def set_ddp_ignored_names(module: nn.Module, names: Sequence[str]) -> None:
    """Ask DistributedDataParallel (wrapping ``module`` later) to neither broadcast nor reduce ``names``."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(names))


def fake_store() -> Any:
    """A ``FakeStore`` for ``init_process_group("fake", ...)`` (importing it registers the fake backend)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


# -- Lightning --------------------------------------------------------------------------------------

_TRAINER_RUN_CODE = Trainer._run.__code__


def running_weights_only() -> bool | None:
    """The ``weights_only`` given to the running ``Trainer.fit/validate/test/predict`` (None outside one).

    Lightning 2.6's ``Trainer._run`` passes it to the checkpoint connector only for strategies that
    restore before setup; ``MoEStrategy`` restores after setup and reads it from ``_run``'s frame.
    """
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is _TRAINER_RUN_CODE:
            return frame.f_locals.get("weights_only")
        frame = frame.f_back
    return None


def reset_optimizers(strategy: Any) -> None:
    """Forget a strategy's optimizers and schedulers (``setup_optimizers`` then makes new ones)."""
    strategy._reset_optimizers_and_schedulers()


SubprocessScriptLauncher = _SubprocessScriptLauncher
optimizer_to_device = _optimizer_to_device
PATH = _PATH

__all__ = [
    "FF_BLOCK",
    "LIGHTNING_CHECKED",
    "PATH",
    "PRIVATE_NAMES",
    "PrivateName",
    "SubprocessScriptLauncher",
    "TORCH_CHECKED",
    "ddp_ignored_names",
    "disable_fused_encoder_fast_path",
    "fake_store",
    "flatten_dense_tensors",
    "funcol",
    "grouped_mm",
    "has_forward_hooks",
    "make_saved_tensor",
    "optimizer_to_device",
    "reset_optimizers",
    "running_weights_only",
    "set_ddp_ignored_names",
    "unflatten_dense_tensors",
    "weight_int8pack_mm",
]
