"""What compression reports, and the expert banks it may touch (shared by both methods)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_moe.nn.experts import GroupedExperts
from lightning_moe.nn.moe import find_moe_layers

WEIGHTS = ("w1", "w2", "w3")
SUPPORTED_ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def check_supported(owner: str, experts: GroupedExperts) -> None:
    """Refuse banks whose computation the compressed banks do not reproduce (rather than change it silently)."""
    if experts.activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{owner}: experts with activation={experts.activation!r} are not supported (only "
                         f"{SUPPORTED_ACTIVATIONS}); leave those layers uncompressed")



@dataclass
class LayerCompression:
    """Saving of one expert bank.

    Attributes:
        name: module path of the bank (``"blocks.0.moe.experts"``).
        params_before: elements of the bank's weights before (int8 elements count as params too).
        params_after: elements after.
        bytes_before: bytes of the bank's parameters and buffers before.
        bytes_after: bytes after.
        detail: method specifics, e.g. ``{"w1": 12}`` ranks, or ``{"w1": "dense"}`` where a
            factorization would not save anything.
    """

    name: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    detail: dict = field(default_factory=dict)


@dataclass
class CompressionReport:
    """What a compression did, bank by bank; totals as properties."""

    method: str
    layers: list[LayerCompression] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after``: how many times smaller the expert banks became."""
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        lines = [f"{self.method}: expert bytes {self.bytes_before:,} -> {self.bytes_after:,} ({self.ratio:.2f}x), "
                 f"params {self.params_before:,} -> {self.params_after:,}"]
        lines += [f"  {layer.name}: {layer.bytes_before:,} -> {layer.bytes_after:,} B {layer.detail or ''}".rstrip()
                  for layer in self.layers]
        return "\n".join(lines)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weight_numel(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() for t in tensors.values() if t.dtype != torch.long)


class CompressedExperts(nn.Module):
    """Base of the compressed banks: same interface as GroupedExperts, ``(x_MD, counts) -> y_MD``."""


def expert_banks(model: nn.Module, include_shared: bool):
    """Yield ``(path, owner MoE, attribute)`` of every expert bank in ``model``."""
    for name, layer in find_moe_layers(model):
        prefix = f"{name}." if name else ""
        yield f"{prefix}experts", layer, "experts"
        if include_shared and layer.shared_experts is not None:
            yield f"{prefix}shared_experts", layer, "shared_experts"


def check_bank(bank: nn.Module, path: str, method: str) -> bool:
    if isinstance(bank, GroupedExperts):
        return True
    if isinstance(bank, CompressedExperts):
        return False  # already compressed: applying twice is a no-op
    warnings.warn(f"{method}: {path} is a {type(bank).__name__}, not GroupedExperts; left uncompressed", stacklevel=3)
    return False
