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
        elif bank.activation == "swiglu_oai":  # GPT-OSS, written out as in its paper/model card
            up = x_D @ bank.w3[e] + (bank.b3[e] if bank.b3 is not None else 0)
            gate = torch.minimum(h, torch.full_like(h, bank.swiglu_limit))
            up = torch.maximum(torch.minimum(up, torch.full_like(up, bank.swiglu_limit)),
                               torch.full_like(up, -bank.swiglu_limit))
            h = (up + 1) * gate * (1 / (1 + torch.exp(-bank.swiglu_alpha * gate)))
        else:
            h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[bank.activation](h)
        y = h @ bank.w2[e]
        return y + bank.b2[e] if bank.b2 is not None else y

    return run


def _choose(selection: list[float], k: int, num_groups: int, top_groups: int) -> list[int]:
    """One token's k experts: best groups first (group score = sum of its two best), then best experts."""
    E = len(selection)
    allowed = range(E)
    if num_groups > 1:
        size = E // num_groups
        group_score = [sum(sorted(selection[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
        groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:top_groups]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
    return sorted(allowed, key=lambda e: -selection[e])[:k]


def _token_choice_weights(layer: MoE, logits: torch.Tensor, scores: torch.Tensor):
    """Per-token expert ids and weights, one token at a time."""
    K = layer.top_k
    use_bias = layer.bias_update_rate > 0 or layer.use_expert_bias
    ids, weights = [], []
    for logit, score in zip(logits, scores, strict=True):
        chooser = logit if layer.score_func == "softmax_topk" else score
        selection = (chooser + layer.router.expert_bias if use_bias else chooser).tolist()
        chosen = _choose(selection, K, layer.num_groups, layer.top_groups)
        if layer.score_func == "softmax_topk":
            w = torch.softmax(logit[chosen], -1)
        else:
            w = score[chosen]
            if layer.normalize_weights and K > 1:
                w = w / w.sum()
        ids.append(chosen)
        weights.append(w * layer.routed_scaling_factor)
    return torch.tensor(ids, dtype=torch.long).reshape(len(ids), K), (
        torch.stack(weights) if weights else logits.new_zeros(0, K))


def reference_moe(layer: MoE, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    D, E, K = layer.dim, layer.num_experts, layer.top_k
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    valid = [True] * T if padding_mask is None else [not bool(p) for p in padding_mask.reshape(-1)]
    logits = x_TD.float() @ layer.router.gate.weight.float().t()
    if layer.router.gate.bias is not None:
        logits = logits + layer.router.gate.bias.float()
    scores = torch.sigmoid(logits) if layer.score_func == "sigmoid" else torch.softmax(logits, -1)
    out = [x_TD.new_zeros(D) for _ in range(T)]
    experts = [_expert_fn(layer.experts, e) for e in range(E)]

    if layer.router_type == "token_choice":
        ids, weights = _token_choice_weights(layer, logits, scores)
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
        shared = []
        for t in range(T):
            y = _expert_fn(layer.shared_experts, 0)(x_TD[t])
            if layer.shared_gate is not None:
                y = y / (1 + torch.exp(-(x_TD[t] @ layer.shared_gate.weight[0])))
            shared.append(y)
        y_TD = y_TD + torch.stack(shared).reshape(T, D)
    return y_TD.reshape(x.shape)
