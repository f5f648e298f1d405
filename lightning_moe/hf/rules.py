"""Recognise a transformers (v5) sparse MoE block by rule and read what it computes.

The rule, not one class per model: a block is convertible when it has

- a router child (``gate`` or ``router``; class name ending in ``Router``) with a ``weight [E, D]``,
  an optional ``bias [E]`` and an optional ``e_score_correction_bias [E]`` buffer, whose forward
  returns ``(router_logits, top_k_weights, top_k_index)``;
- an ``experts`` child (class name ending in ``Experts``) holding stacked ``gate_up_proj`` (or
  ``up_proj``) and ``down_proj`` tensors, with the layout flags of transformers'
  ``@use_experts_implementation`` (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``);
- optionally a shared expert (``shared_expert``/``shared_experts``: ``gate_proj``/``up_proj``/
  ``down_proj`` linears with SiLU) and a ``shared_expert_gate`` ``Linear(D, 1)``.

How the router turns logits into weights is not read from the class: :func:`probe_router` runs a
float32 copy of the router with random weights against the candidate routings of ``MoE`` and keeps
the one that reproduces it (so Mixtral, Qwen, OLMoE, DeepSeek-V3 and GPT-OSS routers, and new
ones built the same way, are told apart by what they compute).

Shape legend: T probe tokens, D model width, E experts, K top_k, H expert hidden width.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.nn.experts import swiglu_oai
from lightning_moe.nn.router import TokenChoiceRouter

ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_expert", "shared_experts")
_MOE_CLASS = re.compile(r"(Sparse)?Mo[Ee](Block|Layer|MLP|Mlp)?$")


class NotConvertible(ValueError):
    """A block that looks like an MoE block but does not follow the v5 convention (the message says why)."""


@dataclass(frozen=True)
class RouterSpec:
    """How a router routes, in the terms of :class:`lightning_moe.MoE` arguments."""

    num_experts: int
    top_k: int
    score_func: str
    normalize_weights: bool
    router_bias: bool
    use_expert_bias: bool
    num_groups: int = 1
    top_groups: int = 1
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class ExpertsSpec:
    """Layout and activation of a stacked experts bank."""

    num_experts: int
    dim: int
    hidden_dim: int
    activation: str  # "swiglu" | "swiglu_oai" | "gelu" | "relu" | "silu"
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None


@dataclass(frozen=True)
class BlockSpec:
    """Everything :func:`lightning_moe.from_hf` needs to rebuild one HF block as an ``MoE``."""

    router_name: str
    router: RouterSpec
    experts: ExpertsSpec
    shared_name: str | None = None
    shared_hidden_dim: int | None = None
    shared_gate: bool = False
    input_jitter: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)


def looks_like_moe(module: nn.Module) -> bool:
    """A module that presents itself as an MoE block (has ``experts``, or an MoE-style class name)."""
    return "experts" in dict(module.named_children()) or bool(_MOE_CLASS.search(type(module).__name__))


def _router_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name in ROUTER_NAMES:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module) and type(child).__name__.lower().endswith("router"):
            return name, child
    return None


def _matches(fn, reference, probe: Tensor) -> bool:
    try:
        with torch.no_grad():
            return torch.allclose(fn(probe), reference(probe), rtol=1e-5, atol=1e-6)
    except Exception:  # an act_fn that does not take a plain tensor is not one of ours
        return False


def _activation_name(act_fn, block_type: str) -> str:
    probe = torch.linspace(-6, 6, 97)
    for name, fn in (("silu", F.silu), ("gelu", F.gelu), ("relu", F.relu),
                     ("gelu", lambda x: F.gelu(x, approximate="tanh"))):
        if _matches(act_fn, fn, probe):
            return name
    raise NotConvertible(f"{block_type}: expert activation {type(act_fn).__name__} is none of SiLU, GELU, ReLU; "
                         "lightning_moe.MoE has no such activation")


def _gated_activation(experts: nn.Module, hidden: int, concatenated: bool, alpha, limit, block_type: str) -> str:
    """``"swiglu"`` or ``"swiglu_oai"``: whichever reproduces the bank's gating on a probe."""
    gate_fn = getattr(experts, "_apply_gate", None)
    if gate_fn is None:  # no gating hook: the eager forward's act_fn(gate) * up on [gate; up]
        if _activation_name(getattr(experts, "act_fn", None), block_type) != "silu":
            raise NotConvertible(f"{block_type}: gated experts without SiLU (GEGLU-style); lightning_moe.MoE gates "
                                 "with SiLU only")
        return "swiglu"
    z_TW = torch.randn(16, 2 * hidden, generator=torch.Generator().manual_seed(0)) * 4
    gate_TH, up_TH = (z_TW[:, :hidden], z_TW[:, hidden:]) if concatenated else (z_TW[:, 0::2], z_TW[:, 1::2])
    candidates = {"swiglu": lambda: F.silu(gate_TH) * up_TH}
    if alpha is not None and limit is not None:
        candidates["swiglu_oai"] = lambda: swiglu_oai(gate_TH, up_TH, float(alpha), float(limit))
    try:
        with torch.no_grad():
            out_TH = gate_fn(z_TW)
    except Exception as error:  # a gate we cannot call is not one we can convert
        raise NotConvertible(f"{block_type}: the experts' gating (_apply_gate) fails on a probe: {error}") from error
    for activation, expected in candidates.items():
        if out_TH.shape == (16, hidden) and torch.allclose(out_TH, expected(), rtol=1e-5, atol=1e-5):
            return activation
    raise NotConvertible(f"{block_type}: the experts' gating is neither SwiGLU nor GPT-OSS's clamped SwiGLU")


def read_experts(experts: nn.Module, block_type: str) -> ExpertsSpec:
    """Read the layout flags and the activation of a v5 ``*Experts`` bank."""
    name = type(experts).__name__
    if not name.endswith("Experts"):
        raise NotConvertible(f"{block_type}: its experts are a {name}, not a v5 stacked '*Experts' bank")
    if getattr(experts, "has_post_expert_norm", False):
        raise NotConvertible(f"{block_type}: {name} normalises each expert's output (has_post_expert_norm), "
                             "which lightning_moe.MoE does not do")
    has_gate = bool(getattr(experts, "has_gate", hasattr(experts, "gate_up_proj")))
    first = getattr(experts, "gate_up_proj" if has_gate else "up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(first, Tensor) or not isinstance(down, Tensor) or first.ndim != 3 or down.ndim != 3:
        raise NotConvertible(f"{block_type}: {name} lacks stacked 3-D 'gate_up_proj'/'up_proj' and 'down_proj' "
                             "tensors")
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    has_bias = bool(getattr(experts, "has_bias", False))
    num_experts = first.shape[0]
    width = first.shape[2] if transposed else first.shape[1]
    dim = first.shape[1] if transposed else first.shape[2]
    hidden = width // 2 if has_gate else width
    down_shape = (num_experts, hidden, dim) if transposed else (num_experts, dim, hidden)
    if (has_gate and width % 2) or tuple(down.shape) != down_shape:
        raise NotConvertible(f"{block_type}: {name} tensors have shapes {tuple(first.shape)} and "
                             f"{tuple(down.shape)}, not a consistent expert layout")
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if has_gate:
        activation = _gated_activation(experts, hidden, concatenated, alpha, limit, block_type)
        if activation == "swiglu" and has_bias:
            raise NotConvertible(f"{block_type}: {name} is a SwiGLU bank with biases; lightning_moe's SwiGLU has no "
                                 "up-projection bias (only activation='swiglu_oai' does)")
    else:
        activation = _activation_name(getattr(experts, "act_fn", None), block_type)
    if activation != "swiglu_oai":
        alpha = limit = None
    return ExpertsSpec(num_experts, dim, hidden, activation, has_gate, has_bias, transposed, concatenated,
                       None if alpha is None else float(alpha), None if limit is None else float(limit))


def read_shared(block: nn.Module, block_type: str) -> tuple[str | None, int | None]:
    """The shared-expert child's name and hidden width (SwiGLU MLP of three bias-free linears)."""
    for name in SHARED_NAMES:
        mlp = getattr(block, name, None)
        if mlp is None:
            continue
        parts = [p for p in (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
                 if isinstance(p, nn.Linear)]
        if len(parts) != 3:
            raise NotConvertible(f"{block_type}: shared expert {type(mlp).__name__} is not a gate_proj/up_proj/"
                                 "down_proj SwiGLU MLP")
        if any(p.bias is not None for p in parts):
            raise NotConvertible(f"{block_type}: shared expert {type(mlp).__name__} has biases; the shared SwiGLU "
                                 "of lightning_moe.MoE has none on its up projection")
        if _activation_name(getattr(mlp, "act_fn", None), block_type) != "silu":
            raise NotConvertible(f"{block_type}: shared expert {type(mlp).__name__} does not gate with SiLU")
        return name, parts[0].out_features
    return None, None


def _tensor_attr(module: nn.Module, name: str) -> Tensor:
    """``module.<name>``, which the caller checked is a tensor."""
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is a {type(value).__name__}, not a tensor")
    return value


def _attr(module: nn.Module, *names: str, default=None):
    for name in names:
        if getattr(module, name, None) is not None:
            return getattr(module, name)
    return default


def _router_candidates(router: nn.Module) -> list[tuple[str, bool]]:
    """(score_func, normalize_weights) to try, the ones the router's attributes suggest first."""
    norm = _attr(router, "norm_topk_prob")
    if hasattr(router, "e_score_correction_bias"):
        first = [("sigmoid", bool(norm) if norm is not None else True)]
    else:
        first = [("softmax", bool(norm) if norm is not None else True)]
    rest = [("softmax", True), ("softmax", False), ("softmax_topk", True), ("sigmoid", True), ("sigmoid", False)]
    return first + [c for c in rest if c not in first]


def probe_router(router: nn.Module, block_type: str, tokens: int = 96) -> RouterSpec:
    """Find the ``MoE`` routing that reproduces ``router`` on random tokens and random router weights.

    Runs a float32 copy of the router (its weights randomised, so routing is informative whatever the
    checkpoint holds) and every candidate :class:`~lightning_moe.nn.router.TokenChoiceRouter` on the
    same weights; a candidate matches when it picks the same experts for every token with the same
    weights (to 1e-5).

    Raises:
        NotConvertible: when the router has no ``weight [E, D]`` or no candidate reproduces it.
    """
    rname = type(router).__name__
    weight = getattr(router, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise NotConvertible(f"{block_type}: router {rname} has no 2-D 'weight' [num_experts, dim]")
    num_experts, dim = weight.shape
    top_k = _attr(router, "top_k", "num_experts_per_tok")
    if not isinstance(top_k, int):
        raise NotConvertible(f"{block_type}: router {rname} has no integer 'top_k'")
    bias = getattr(router, "bias", None)
    has_bias = isinstance(bias, Tensor)
    has_correction = isinstance(getattr(router, "e_score_correction_bias", None), Tensor)
    num_groups = int(_attr(router, "num_group", "n_group", default=1))
    top_groups = int(_attr(router, "topk_group", default=1)) if num_groups > 1 else 1
    scaling = float(_attr(router, "routed_scaling_factor", default=1.0))
    if weight.device.type == "meta":
        raise NotConvertible(f"{block_type}: router {rname} is on the meta device; load or materialise the weights "
                             "before converting")

    probe = copy.deepcopy(router).float()
    probe_weight = _tensor_attr(probe, "weight")
    probe_bias = _tensor_attr(probe, "bias") if has_bias else None
    probe_correction = _tensor_attr(probe, "e_score_correction_bias") if has_correction else None
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe_weight.copy_(torch.randn(num_experts, dim, generator=generator))
        if probe_bias is not None:
            probe_bias.copy_(torch.randn(num_experts, generator=generator))
        if probe_correction is not None:
            probe_correction.copy_(torch.randn(num_experts, generator=generator) * 0.2)
        x_TD = torch.randn(tokens, dim, generator=generator).div_(dim ** 0.5).to(weight.device)
        try:
            out = probe(x_TD)
        except Exception as error:  # any failure means: not the convention
            raise NotConvertible(f"{block_type}: router {rname} does not run on [tokens, dim] input: "
                                 f"{error}") from error
    if not (isinstance(out, tuple) and len(out) == 3):
        raise NotConvertible(f"{block_type}: router {rname} does not return (logits, top_k_weights, top_k_index)")
    hf_ids_TK, hf_weights_TK = _sorted_routing(out[2], out[1])
    # Several routings can agree (softmax over all + renormalisation IS a softmax over the top k): keep
    # the closest, which is the one computed the way the router computes it.
    best: tuple[float, RouterSpec] | None = None
    for score_func, normalize in _router_candidates(router):
        spec = RouterSpec(num_experts, top_k, score_func, normalize, has_bias, has_correction, num_groups, top_groups,
                          scaling)
        ours = routing_router(spec, dim).to(weight.device)
        with torch.no_grad():
            ours.gate.weight.copy_(probe_weight)
            if probe_bias is not None:
                ours.gate.bias.copy_(probe_bias)
            if probe_correction is not None:
                ours.expert_bias.copy_(probe_correction)
            routing = ours(x_TD)
        ids_TK, weights_TK = _sorted_routing(routing.top_ids_TK, routing.top_weights_TK)
        if torch.equal(ids_TK, hf_ids_TK) and torch.allclose(weights_TK, hf_weights_TK, rtol=1e-5, atol=1e-6):
            gap = float((weights_TK - hf_weights_TK).abs().max())
            if best is None or gap < best[0]:
                best = (gap, spec)
    if best is not None:
        return best[1]
    raise NotConvertible(f"{block_type}: router {rname} routes like none of lightning_moe's token-choice routings "
                         "(softmax / sigmoid / softmax over the top k, with or without renormalisation)")


def routing_router(spec: RouterSpec, dim: int) -> TokenChoiceRouter:
    """A float32 :class:`TokenChoiceRouter` configured as ``spec`` (for probes)."""
    return TokenChoiceRouter(dim, spec.num_experts, spec.top_k, spec.score_func, spec.normalize_weights,
                             bias=spec.router_bias, use_expert_bias=spec.use_expert_bias, num_groups=spec.num_groups,
                             top_groups=spec.top_groups, routed_scaling_factor=spec.routed_scaling_factor)


def _sorted_routing(ids_TK: Tensor, weights_TK: Tensor) -> tuple[Tensor, Tensor]:
    ids_TK, order_TK = ids_TK.long().sort(dim=-1)
    return ids_TK, weights_TK.float().gather(-1, order_TK)


def read_block(block: nn.Module) -> BlockSpec:
    """Read a block that follows the v5 convention.

    Raises:
        NotConvertible: naming the block type and what breaks the convention.
    """
    block_type = type(block).__name__
    found = _router_child(block)
    if found is None:
        raise NotConvertible(f"{block_type}: no router child named {' or '.join(ROUTER_NAMES)} with a class name "
                             "ending in 'Router'")
    router_name, router = found
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        raise NotConvertible(f"{block_type}: no 'experts' child")
    experts_spec = read_experts(experts, block_type)
    shared_name, shared_hidden = read_shared(block, block_type)
    shared_gate = getattr(block, "shared_expert_gate", None)
    if shared_gate is not None:
        if not (isinstance(shared_gate, nn.Linear) and shared_gate.out_features == 1 and shared_gate.bias is None):
            raise NotConvertible(f"{block_type}: shared_expert_gate is not a bias-free Linear(dim, 1)")
        if shared_name is None:
            raise NotConvertible(f"{block_type}: shared_expert_gate without a shared expert")
    known = {router_name, "experts", shared_name, "shared_expert_gate" if shared_gate is not None else None}
    unknown = [n for n, m in block.named_children() if n not in known and any(True for _ in m.parameters())]
    unknown += [n for n, _ in block.named_parameters(recurse=False)]
    if unknown:
        raise NotConvertible(f"{block_type}: holds weights outside the router, experts and shared expert "
                             f"({', '.join(unknown)}); its forward may use them in ways MoE does not")
    router_spec = probe_router(router, block_type)
    if router_spec.num_experts != experts_spec.num_experts:
        raise NotConvertible(f"{block_type}: router has {router_spec.num_experts} experts, the bank "
                             f"{experts_spec.num_experts}")
    if shared_name is not None and experts_spec.activation != "swiglu":
        raise NotConvertible(f"{block_type}: a SwiGLU shared expert next to {experts_spec.activation} experts; "
                             "lightning_moe.MoE uses one activation for both")
    jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
    return BlockSpec(router_name, router_spec, experts_spec, shared_name, shared_hidden, shared_gate is not None,
                     jitter)
