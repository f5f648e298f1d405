"""Sparse upcycling (Komatsuzaki et al. 2022): turn the dense feed-forward blocks of a model into MoE layers.

:func:`upcycle` works in place on any ``nn.Module`` (a plain model inside any LightningModule). Every expert
starts as a copy of the dense block, so with the default token-choice router, ``top_k >= 2`` and normalised
weights (they sum to 1 over identical experts) the converted model computes exactly what the dense one did,
whatever the router's initial weights. Training then makes the experts diverge.

What it converts (first match wins, walking the module tree from the root; children of a converted module
are left alone):

* ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: ``linear1 -> activation -> linear2`` becomes
  ``layer.moe`` (stacked experts, biases kept); the layer's class is swapped for a subclass whose ``_ff_block``
  calls the MoE and which never takes torch's fused inference fast path (that kernel reads ``linear1`` and
  ``linear2`` directly and would bypass the experts). Parent ``nn.TransformerEncoder`` s stop converting
  padded batches to nested tensors (the MoE needs a dense ``[..., dim]`` input).
* MLP modules named ``mlp`` / ``ffn`` / ``feed_forward`` with ``fc1``/``fc2``, ``c_fc``/``c_proj``,
  ``w1``/``w2`` (GELU/ReLU/SiLU) or ``gate_proj``/``up_proj``/``down_proj``, ``w1``/``w3``/``w2`` (SwiGLU), or an
  ``nn.Sequential(Linear, act, [Dropout], Linear)``: converted to stacked weights. The activation is read from the
  module's children, or found by trying GELU, ReLU and SiLU on a probe input; every stacked conversion is checked
  against the dense module on a probe input before it is applied.
* With ``target`` (a module type, a name pattern or a predicate) exactly the matching modules; ones that are not
  of the kinds above become :class:`~lightning_moe.nn.TemplateExperts`: copies of the module itself.

Anything that matched but could not be converted is listed in :attr:`UpcycleReport.skipped` with the reason.
Stacked experts have no dropout: a dropout inside a converted block (e.g. the one between a torch layer's two
linears) is dropped, and :attr:`UpcycleReport.notes` says so.
"""


from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

from lightning_moe.nn.moe import MoE
from lightning_moe.upcycle_convert import (
    MLP_NAMES,
    Converter,
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    Skip,
    UpcycledModule,
    num_params,
)

__all__ = ["MoETransformerDecoderLayer", "MoETransformerEncoderLayer", "SkippedModule", "UpcycleReport",
           "UpcycledModule", "upcycle"]

Target = Union[type, tuple, str, re.Pattern, Callable[[str, nn.Module], bool], None]  # noqa: UP007 (readable alias)

# Arguments that upcycle derives from the dense block; the rest of MoE's arguments pass through.
_DERIVED_ARGS = ("dim", "num_experts", "top_k", "hidden_dim", "activation", "expert", "bias", "device", "dtype")


@dataclass
class SkippedModule:
    """A module that matched but was left dense, and why."""

    name: str
    reason: str


@dataclass
class UpcycleReport:
    """What :func:`upcycle` did.

    Attributes:
        num_experts: experts per converted block.
        top_k: experts per token.
        converted: the converted blocks.
        skipped: matched modules left dense, with the reason.
        params_before: parameters of the whole model before.
        params_after: parameters of the whole model after.
        exact: True when the converted model computes what the dense one did (eval mode).
        notes: why it is not exact, and other things worth knowing.
    """

    num_experts: int
    top_k: int
    converted: list[UpcycledModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    exact: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def active_params(self) -> int:
        """Parameters one token touches in the converted model (all dense parameters + active expert ones)."""
        return self.params_after - sum(m.params_after - m.active_params for m in self.converted)

    def __str__(self) -> str:
        lines = [f"upcycle: {len(self.converted)} block(s) -> MoE(num_experts={self.num_experts}, top_k={self.top_k})"]
        for m in self.converted:
            lines.append(f"  {m.name or '<root>'}: {m.kind} dim={m.dim} hidden={m.hidden_dim} act={m.activation} "
                         f"params {m.params_before:,} -> {m.params_after:,} (active {m.active_params:,})")
        for s in self.skipped:
            lines.append(f"  skipped {s.name or '<root>'}: {s.reason}")
        lines.append(f"  model params {self.params_before:,} -> {self.params_after:,} "
                     f"(active per token {self.active_params:,}); exact={self.exact}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Public entry point.


def upcycle(
    model: nn.Module,
    num_experts: int,
    top_k: int = 2,
    target: Target = None,
    noise: float = 0.0,
    **moe_kwargs: Any,
) -> UpcycleReport:
    """Replace the dense feed-forward blocks of ``model`` by :class:`~lightning_moe.MoE` layers, in place.

    Call it on the trained dense model before ``Trainer.fit`` (load dense checkpoints first: the state dict
    keys change, e.g. ``linear1.weight`` becomes ``moe.experts.w1``). A plain LightningModule gets the
    balancing losses by adding them to its loss,
    ``loss = task_loss + sum(m.aux_loss for m in self.modules() if isinstance(m, lmoe.MoE))``,
    or by deriving from :class:`~lightning_moe.MoELightningModule`, which does it for it.

    Args:
        model: the model; modified in place.
        num_experts: experts per converted block.
        top_k: experts per token. Keep ``>= 2`` for an exact conversion: with ``top_k=1`` a token's output
            is scaled by its router probability (Switch Transformer), so the converted model starts off
            the dense one.
        target: what to convert. None: the default targets (module docstring). A module type or tuple of
            types; a name pattern matched against qualified module names, either an fnmatch string
            (``"layers.*.mlp"``, ``*`` spans dots) or a compiled regex (``re.compile(r"layers\\.\\d+\\.mlp")``,
            full match); or a predicate ``(name, module) -> bool``.
        noise: relative Gaussian noise on expert weights, ``w * (1 + noise * N(0, 1))`` drawn per expert,
            to break the symmetry between experts; 0 keeps them identical (and the conversion exact).
        **moe_kwargs: further :class:`~lightning_moe.MoE` arguments (``router``, ``score_func``,
            ``capacity_factor``, ``num_shared_experts``, ``aux_loss_coef``, ...). Shared experts start with a
            zero output projection, so they do not change the output at conversion.

    Returns:
        An :class:`UpcycleReport`: converted blocks with parameter counts, skipped modules with reasons,
        and whether the conversion is exact.

    Raises:
        ValueError: on a bad ``num_experts``, ``top_k``, ``noise`` or ``target``, or a ``moe_kwargs`` key that
            upcycle derives from the dense block.

    Example:
        >>> import torch
        >>> layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        >>> report = upcycle(layer, num_experts=4)
        >>> [(m.kind, m.hidden_dim) for m in report.converted]
        [('encoder_layer', 32)]
        >>> type(layer).__name__, layer(torch.randn(2, 3, 16)).shape
        ('MoETransformerEncoderLayer', torch.Size([2, 3, 16]))
    """
    _validate(num_experts, top_k, noise, target, moe_kwargs)
    report = UpcycleReport(num_experts=num_experts, top_k=top_k, params_before=num_params(model))
    matches = _target_match(target)
    converter = Converter(num_experts, top_k, noise, moe_kwargs)

    claimed: list[str] = []
    plan: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") or prefix == "" for prefix in claimed):
            continue
        if isinstance(module, MoE):
            claimed.append(name)
            continue
        if matches(name, module):
            claimed.append(name)
            plan.append((name, module))

    for name, module in plan:
        try:
            result = converter.convert(name, module)
        except Skip as skip:
            report.skipped.append(SkippedModule(name, str(skip)))
            continue
        new_module, info = result
        if new_module is not module:
            if name == "":
                report.skipped.append(SkippedModule(name, "the root module cannot be replaced in place; call "
                                                          "upcycle on its parent"))
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new_module)
        report.converted.append(info)

    _disable_nested_tensor_fast_path(model)
    report.params_after = num_params(model)
    _exactness(report, noise, top_k, moe_kwargs)
    report.notes += converter.notes
    if not report.converted:
        warnings.warn(f"upcycle: no feed-forward block was converted in {type(model).__name__}"
                      + (f" (skipped: {[s.name for s in report.skipped]})" if report.skipped else "")
                      + "; pass target= to choose the modules", UserWarning, stacklevel=2)
    return report


def _validate(num_experts, top_k, noise, target, moe_kwargs) -> None:
    for arg, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"upcycle: {arg}={value!r} must be a positive int")
    if top_k > num_experts:
        raise ValueError(f"upcycle: top_k={top_k} must be <= num_experts={num_experts}; lower top_k or add experts")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"upcycle: noise={noise!r} must be a float >= 0 (relative weight noise; 0 disables it)")
    derived = sorted(set(moe_kwargs) & set(_DERIVED_ARGS))
    if derived:
        raise ValueError(f"upcycle: {derived} are taken from the dense block; remove them from the arguments "
                         "(use target= and your own module for other expert shapes)")
    if target is not None and not (isinstance(target, (type, str, re.Pattern)) or callable(target)
                                   or (isinstance(target, tuple) and all(isinstance(t, type) for t in target))):
        raise ValueError(f"upcycle: target={target!r} must be a module type, a tuple of types, a name pattern "
                         "(fnmatch string or re.compile(...)) or a predicate (name, module) -> bool")


def _default_match(name: str, module: nn.Module) -> bool:
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return True
    return name.rpartition(".")[2] in MLP_NAMES


def _target_match(target: Target) -> Callable[[str, nn.Module], bool]:
    if target is None:
        return _default_match
    if isinstance(target, (type, tuple)):
        return lambda name, module: isinstance(module, target)
    if isinstance(target, str):
        return lambda name, module: bool(name) and fnmatch.fnmatchcase(name, target)
    if isinstance(target, re.Pattern):
        return lambda name, module: bool(name) and target.fullmatch(name) is not None
    return lambda name, module: bool(target(name, module))


def _disable_nested_tensor_fast_path(model: nn.Module) -> None:
    # nn.TransformerEncoder turns padded eval batches into nested tensors and reads layers[0].linear1 when it
    # does: neither works once the layers hold an MoE.
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(hasattr(layer, "moe") for layer in module.layers):
            module.use_nested_tensor = False


def _exactness(report: UpcycleReport, noise: float, top_k: int, moe_kwargs: dict) -> None:
    reasons = []
    if moe_kwargs.get("router", "token_choice") == "expert_choice":
        reasons.append("router='expert_choice' weights each expert's output by its raw score and may skip tokens")
    elif top_k == 1:
        reasons.append("top_k=1 scales each token's output by its router probability (< 1); use top_k >= 2 "
                       "for an exact start")
    elif not moe_kwargs.get("normalize_weights", True):
        reasons.append("normalize_weights=False: the top-k weights do not sum to 1")
    if moe_kwargs.get("capacity_factor") is not None:
        reasons.append("capacity_factor drops tokens that overflow an expert")
    if reasons and report.converted:
        warnings.warn("upcycle: the converted model does not start equal to the dense one: " + "; ".join(reasons),
                      UserWarning, stacklevel=3)
    if noise > 0:
        reasons.append(f"noise={noise} perturbs the expert copies")
    report.exact = not reasons
    report.notes += reasons


