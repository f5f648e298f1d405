"""Routers: score tokens against experts in float32 and decide who goes where.

Routing is numerically touchy (a softmax over logits whose small differences pick experts), so the
router always computes in float32 (Switch Transformer's selective precision): the input is upcast,
autocast is switched off, and the gate weight is read as float32 whatever dtype it is stored in.

Shape legend: T tokens, D model width, E experts, K top_k, C expert capacity.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_moe.nn import functional as MF


class TokenRouting(NamedTuple):
    logits_TE: Tensor
    scores_TE: Tensor
    top_ids_TK: Tensor  # expert id per token and slot; E marks an unrouted (padded) token
    top_weights_TK: Tensor


class ExpertRouting(NamedTuple):
    logits_TE: Tensor
    scores_TE: Tensor
    token_ids_EC: Tensor
    weights_EC: Tensor
    chosen_EC: Tensor


class _Router(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int,
        score_func: str = "softmax",
        jitter: float = 0.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.score_func = score_func
        self.jitter = jitter
        self.gate = nn.Linear(dim, num_experts, bias=bias, device=device, dtype=dtype)
        if bias and self.gate.bias.device.type != "meta":
            # A learned logit offset that starts neutral: the initial routing is the weights' alone.
            nn.init.zeros_(self.gate.bias)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in float32, autocast off, multiplicative input jitter in training only."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.jitter > 0:
                noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
                x_TD = x_TD * noise
            bias = self.gate.bias.float() if self.gate.bias is not None else None
            return torch.nn.functional.linear(x_TD, self.gate.weight.float(), bias)


class TokenChoiceRouter(_Router):
    """Token-choice top-k routing (Switch k=1, GShard / Mixtral k=2, DeepSeek sigmoid + bias).

    Holds a persistent ``expert_bias`` buffer (aux-loss-free balancing, DeepSeek-V3): it is added to
    the scores only to choose experts; the chosen experts' weights come from the raw scores. It is
    used when ``bias_update_rate > 0`` (then updated by :meth:`update_expert_bias`) or when
    ``use_expert_bias`` (a fixed, loaded bias such as DeepSeek-V3's ``e_score_correction_bias``).

    Options of published routers: ``score_func="softmax_topk"`` (GPT-OSS: softmax over the chosen
    experts' logits), ``num_groups``/``top_groups`` (DeepSeek-V3 group-limited top-k),
    ``routed_scaling_factor`` (DeepSeek-V3: scales the final weights) and a gate bias (GPT-OSS).

    Example:
        >>> router = TokenChoiceRouter(dim=8, num_experts=4, top_k=2)
        >>> routing = router(torch.randn(5, 8))
        >>> routing.top_ids_TK.shape, routing.top_weights_TK.sum(-1).allclose(torch.ones(5))
        (torch.Size([5, 2]), True)
    """

    expert_bias: Tensor  # persistent buffer, registered in __init__ (annotated for type checkers)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        normalize_weights: bool = True,
        jitter: float = 0.0,
        bias_update_rate: float = 0.0,
        bias: bool = False,
        use_expert_bias: bool = False,
        num_groups: int = 1,
        top_groups: int = 1,
        routed_scaling_factor: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, score_func, jitter, bias=bias, device=device, dtype=dtype)
        self.top_k = top_k
        self.normalize_weights = normalize_weights
        self.bias_update_rate = bias_update_rate
        self.use_expert_bias = use_expert_bias
        self.num_groups = num_groups
        self.top_groups = top_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> TokenRouting:
        logits_TE = self.logits(x_TD)
        scores_TE = MF.router_scores(logits_TE, self.score_func)
        bias_E = self.expert_bias if self.bias_update_rate > 0 or self.use_expert_bias else None
        softmax_topk = self.score_func == "softmax_topk"
        top_ids_TK, top_weights_TK = MF.topk_routing(
            logits_TE if softmax_topk else scores_TE, self.top_k, bias_E, normalize_weights=self.normalize_weights,
            valid_T=valid_T, num_groups=self.num_groups, top_groups=self.top_groups,
            routed_scaling_factor=self.routed_scaling_factor, softmax_topk=softmax_topk,
        )
        return TokenRouting(logits_TE, scores_TE, top_ids_TK, top_weights_TK)

    @torch.no_grad()
    def update_expert_bias(self, load_E: Tensor) -> None:
        """``expert_bias += rate * sign(mean(load) - load)``: under-loaded experts become likelier."""
        load_E = load_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)


class ExpertChoiceRouter(_Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    ``C = ceil(capacity_factor * T * top_k / E)``; every expert is full, so no balancing loss is
    needed, but a token may get no expert (its output is zero; the residual carries it). Not causal.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float = 1.0,
        score_func: str = "softmax",
        jitter: float = 0.0,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_experts, score_func, jitter, bias=bias, device=device, dtype=dtype)
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        capacity = int(MF.expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts))
        return min(max(capacity, 1 if num_tokens else 0), num_tokens)

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> ExpertRouting:
        logits_TE = self.logits(x_TD)
        scores_TE = MF.router_scores(logits_TE, self.score_func)
        # Capacity from the padded length T (known on the host, no sync); padding is masked out.
        token_ids_EC, weights_EC, chosen_EC = MF.expert_choice_routing(
            scores_TE, self.capacity(x_TD.shape[0]), valid_T
        )
        return ExpertRouting(logits_TE, scores_TE, token_ids_EC, weights_EC, chosen_EC)
