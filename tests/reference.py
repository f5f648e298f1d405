"""A slow, obviously-correct MoE forward: loops over tokens and experts, no sorting, no buffers.

The fast layer in ``lightning_moe.nn.moe`` must match it in outputs and gradients for every routing
option (tests/test_moe.py). It reads the layer's parameters, so gradients flow into the same tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_moe import MoE
from lightning_moe.nn.experts import GroupedExperts


def _expert_fn(bank, e: int):
    if not isinstance(bank, GroupedExperts):
        return bank.experts[e]

    def run(x_D):
        h = x_D @ bank.w1[e]
        if bank.b1 is not None:
            h = h + bank.b1[e]
        if bank.activation == "swiglu":
            h = F.silu(h) * (x_D @ bank.w3[e])
        else:
            h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[bank.activation](h)
        y = h @ bank.w2[e]
        return y + bank.b2[e] if bank.b2 is not None else y

    return run


def reference_moe(layer: MoE, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    D, E, K = layer.dim, layer.num_experts, layer.top_k
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    valid = [True] * T if padding_mask is None else [not bool(p) for p in padding_mask.reshape(-1)]
    logits = x_TD.float() @ layer.router.gate.weight.float().t()
    scores = torch.softmax(logits, -1) if layer.score_func == "softmax" else torch.sigmoid(logits)
    out = [x_TD.new_zeros(D) for _ in range(T)]
    experts = [_expert_fn(layer.experts, e) for e in range(E)]

    if layer.router_type == "token_choice":
        selection = scores + layer.router.expert_bias if layer.bias_update_rate > 0 else scores
        ids = torch.topk(selection.detach(), K, dim=-1).indices
        weights = scores.gather(-1, ids)
        if layer.normalize_weights and K > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        n_valid = sum(valid)
        cap = math.inf if layer.capacity_factor is None else math.ceil(layer.capacity_factor * n_valid * K / E)
        used = [0] * E
        for k in range(K):  # first choices have priority over second choices, earlier tokens first
            for t in range(T):
                if not valid[t]:
                    continue
                e = int(ids[t, k])
                if used[e] >= cap:
                    continue
                used[e] += 1
                out[t] = out[t] + weights[t, k].to(x.dtype) * experts[e](x_TD[t])
    else:
        cap = layer.router.capacity(T)
        masked = scores.masked_fill(~torch.tensor(valid)[:, None], -1.0)
        for e in range(E):
            top = torch.topk(masked[:, e].detach(), cap).indices
            for t in top.tolist():
                if valid[t]:
                    out[t] = out[t] + scores[t, e].to(x.dtype) * experts[e](x_TD[t])

    y_TD = torch.stack(out) if T else x_TD.new_zeros(0, D)
    if layer.shared_experts is not None and T:
        y_TD = y_TD + torch.stack([_expert_fn(layer.shared_experts, 0)(x_TD[t]) for t in range(T)]).reshape(T, D)
    return y_TD.reshape(x.shape)
