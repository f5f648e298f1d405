"""The constructor arguments of :class:`~lightning_moe.MoE`, validated once, before anything is built.

Each check raises a ``ValueError`` that names the argument, its value and the fix; ``name`` (the layer's class
name) starts the message. Kept beside ``moe.py`` so that the layer file holds the layer's computation.
"""

from __future__ import annotations

from torch import nn

from lightning_moe.nn import functional as MF
from lightning_moe.nn.experts import ACTIVATIONS

ROUTERS = ("token_choice", "expert_choice")


def validate_args(name: str, dim, num_experts, top_k, hidden_dim, activation, router, score_func, capacity_factor,
                  num_shared_experts, aux_loss_coef, z_loss_coef, bias_update_rate, router_jitter, expert) -> None:
    """The core arguments of :class:`~lightning_moe.MoE`; ``name`` starts every error message."""
    for arg, value in (("dim", dim), ("num_experts", num_experts), ("top_k", top_k), ("hidden_dim", hidden_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: {arg}={value!r} must be a positive int")
    if top_k > num_experts:
        raise ValueError(f"{name}: top_k={top_k} must be <= num_experts={num_experts}; lower top_k or add experts")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation={activation!r} must be one of {ACTIVATIONS}")
    if router not in ROUTERS:
        raise ValueError(f"{name}: router={router!r} must be one of {ROUTERS}")
    if score_func not in MF.SCORE_FUNCS:
        raise ValueError(f"{name}: score_func={score_func!r} must be one of {MF.SCORE_FUNCS}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"{name}: capacity_factor={capacity_factor!r} must be > 0, or None for dropless routing")
    if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
        raise ValueError(f"{name}: num_shared_experts={num_shared_experts!r} must be an int >= 0")
    for arg, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef),
                       ("bias_update_rate", bias_update_rate), ("router_jitter", router_jitter)):
        if not value >= 0:
            raise ValueError(f"{name}: {arg}={value!r} must be >= 0 (0 disables it)")
    if router_jitter >= 1:
        raise ValueError(f"{name}: router_jitter={router_jitter!r} must be < 1 (noise is U(1-eps, 1+eps))")
    if router == "expert_choice" and bias_update_rate > 0:
        raise ValueError(f"{name}: bias_update_rate={bias_update_rate} needs router='token_choice'; "
                         "expert choice is balanced by construction")
    if expert is not None and not isinstance(expert, nn.Module):
        raise ValueError(f"{name}: expert={type(expert).__name__} must be an nn.Module mapping dim -> dim")

def validate_published_options(name: str, num_experts, top_k, activation, router, score_func, num_shared_experts,
                               use_expert_bias, num_groups, top_groups, routed_scaling_factor, shared_expert_gate,
                               shared_expert_hidden_dim, swiglu_alpha, swiglu_limit) -> None:
    """The options that published MoE models need (GPT-OSS, DeepSeek-V3, Qwen2-MoE)."""
    token_choice_only = {"score_func='softmax_topk'": score_func == "softmax_topk",
                         f"num_groups={num_groups}": num_groups != 1,
                         f"routed_scaling_factor={routed_scaling_factor}": routed_scaling_factor != 1.0,
                         "use_expert_bias=True": bool(use_expert_bias)}
    for arg, used in token_choice_only.items():
        if used and router != "token_choice":
            raise ValueError(f"{name}: {arg} needs router='token_choice'; drop it for expert choice")
    for arg, value in (("num_groups", num_groups), ("top_groups", top_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: {arg}={value!r} must be a positive int (1 disables group-limited routing)")
    if num_experts % num_groups:
        raise ValueError(f"{name}: num_groups={num_groups} must divide num_experts={num_experts}")
    if top_groups > num_groups:
        raise ValueError(f"{name}: top_groups={top_groups} must be <= num_groups={num_groups}")
    if num_groups > 1 and top_k > top_groups * (num_experts // num_groups):
        raise ValueError(f"{name}: top_k={top_k} exceeds the {top_groups * (num_experts // num_groups)} experts of "
                         f"top_groups={top_groups} groups; raise top_groups or lower top_k")
    if not (isinstance(routed_scaling_factor, (int, float)) and routed_scaling_factor > 0):
        raise ValueError(f"{name}: routed_scaling_factor={routed_scaling_factor!r} must be a number > 0 "
                         "(1.0 leaves the weights as they are)")
    if shared_expert_gate and not num_shared_experts:
        raise ValueError(f"{name}: shared_expert_gate=True needs num_shared_experts > 0")
    if shared_expert_hidden_dim is not None:
        if not num_shared_experts:
            raise ValueError(f"{name}: shared_expert_hidden_dim={shared_expert_hidden_dim} needs "
                             "num_shared_experts > 0")
        if not isinstance(shared_expert_hidden_dim, int) or shared_expert_hidden_dim <= 0:
            raise ValueError(f"{name}: shared_expert_hidden_dim={shared_expert_hidden_dim!r} must be a positive "
                             "int")
    for arg, value in (("swiglu_alpha", swiglu_alpha), ("swiglu_limit", swiglu_limit)):
        if value is not None and activation != "swiglu_oai":
            raise ValueError(f"{name}: {arg}={value!r} applies to activation='swiglu_oai' only "
                             f"(activation={activation!r}); drop it or switch the activation")
        if value is not None and not value > 0:
            raise ValueError(f"{name}: {arg}={value!r} must be > 0")


__all__ = ["ROUTERS", "validate_args", "validate_published_options"]
