"""The Mixture-of-Experts layer: router + sort-based dispatch + experts (+ shared experts).

A token's path: :meth:`MoE.forward` -> router (``router.py``) -> ``functional.sort_by_expert`` ->
``dispatcher.plan`` and ``dispatcher(...)`` (``dispatch.py``; experts in ``experts.py``) -> combine.

Shape legend (the package's, see :mod:`lightning_moe.nn.functional`): T tokens (flattened leading
dims), D model width, E experts, K top_k, N = T*K assignments, M assignments kept after capacity,
C expert-choice capacity.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_moe.nn import functional as MF
from lightning_moe.nn import recompute
from lightning_moe.nn.dispatch import ExpertDispatcher, LocalDispatcher
from lightning_moe.nn.experts import GroupedExperts, TemplateExperts
from lightning_moe.nn.ops.combine import weighted_combine
from lightning_moe.nn.options import ROUTERS as ROUTERS
from lightning_moe.nn.options import validate_args, validate_published_options
from lightning_moe.nn.reduce import (
    CountReduction,
    LocalCountReduction,
    check_scope,
    scoped_losses,
    start_count_reduction,
)
from lightning_moe.nn.router import ExpertChoiceRouter, TokenChoiceRouter


class MoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward block, a drop-in for an MLP: ``[..., dim] -> [..., dim]``.

    A float32 router sends each token to ``top_k`` experts (token choice) or lets each expert pick
    its tokens (expert choice). Assignments are sorted by expert into one contiguous buffer, each
    expert runs one GEMM per weight on its slice, and the weighted outputs are summed back per
    token. Memory is O(T*K*D): no one-hot ``[T, E, capacity]`` tensors.

    Args:
        dim: model width D.
        num_experts: number of routed experts E.
        top_k: experts per token (token choice) or average experts per token (expert choice).
        hidden_dim: expert hidden width; default ``4 * dim``.
        activation: ``"gelu" | "relu" | "silu" | "swiglu" | "swiglu_oai"`` (GPT-OSS's clamped SwiGLU,
            see ``swiglu_alpha``/``swiglu_limit``).
        router: ``"token_choice" | "expert_choice"``.
        score_func: ``"softmax" | "sigmoid" | "softmax_topk"``. ``"softmax_topk"`` (GPT-OSS, token
            choice) chooses by logit and weights the chosen experts by a softmax over their k logits;
            it equals ``"softmax"`` with ``normalize_weights=True`` for ``top_k > 1``, and gives weight
            1.0 at ``top_k=1`` (Mixtral-style renormalisation).
        capacity_factor: None for dropless; a float > 0 gives each expert
            ``ceil(capacity_factor * T * top_k / E)`` slots and drops (and counts) what overflows.
            Expert choice uses it for its per-expert capacity (default 1.0).
        num_shared_experts: always-active experts (DeepSeek-MoE), fused into one MLP of width
            ``num_shared_experts * hidden_dim`` and added to the output.
        aux_loss_coef: weight of the Switch load-balancing loss.
        z_loss_coef: weight of the ST-MoE router z-loss.
        bias_update_rate: > 0 enables aux-loss-free balancing (DeepSeek-V3): a per-expert bias,
            updated by :meth:`update_expert_bias` outside the forward, steers expert choice.
        router_jitter: multiplicative input noise ``U(1-eps, 1+eps)`` for the router, training only.
        normalize_weights: rescale each token's top-k weights to sum to 1 (``top_k > 1`` only).
        expert: optional template ``nn.Module`` (D -> D), deep-copied and re-initialised per expert.
        bias: give the stacked experts per-expert biases (as ``nn.Linear`` has).
        check_finite: raise ``FloatingPointError`` when router logits are not finite (costs a sync).
        router_bias: give the router's gate a learned bias (logit offset per expert, GPT-OSS);
            initialised to zero.
        use_expert_bias: add the ``expert_bias`` buffer to the scores when choosing experts even
            with ``bias_update_rate=0``: a fixed, loaded score correction (DeepSeek-V3's
            ``e_score_correction_bias``). Selection only; weights come from the raw scores.
        num_groups: > 1 enables group-limited routing (DeepSeek-V3 ``n_group``): the experts form
            ``num_groups`` contiguous groups, each token picks its ``top_groups`` best groups (a group
            scores the sum of its two best selection scores) and its ``top_k`` experts inside them.
        top_groups: groups a token may use (DeepSeek-V3 ``topk_group``); needs ``num_groups > 1``.
        routed_scaling_factor: multiplies the routed experts' weights after normalization
            (DeepSeek-V3); shared experts are not scaled.
        shared_expert_gate: scale the shared experts' output per token by ``sigmoid(x @ g)``, a
            learned ``Linear(dim, 1, bias=False)`` (Qwen2-MoE); needs ``num_shared_experts > 0``.
        shared_expert_hidden_dim: hidden width of the fused shared-experts MLP; default
            ``num_shared_experts * hidden_dim``.
        swiglu_alpha: ``activation="swiglu_oai"``: sigmoid slope (default 1.702).
        swiglu_limit: ``activation="swiglu_oai"``: clamp of the gate and up projections (default 7.0).
        device: where to create parameters (``"meta"`` builds without memory).
        dtype: parameter dtype; the router still computes in float32.
        aux_loss_scope: which tokens the balancing loss and z-loss are means over in training (see
            :mod:`lightning_moe.nn.reduce` for the exact formulas and why): ``"global"`` (default) the
            global batch, counts summed over every rank by :attr:`count_reduction` (installed by
            ``MoEStrategy``), so that N ranks optimise the single-process loss, padding included;
            ``"local"`` this rank's tokens (no collective); ``"sequence"`` DeepSeek-V3's sequence-wise
            balancing loss (input ``[..., S, dim]``), averaged over the global batch's sequences (token
            choice only). Alone, or in eval mode, ``"global"`` equals ``"local"``.

    Attributes:
        aux_loss: balancing + z-loss of the last forward, coefficients applied, with graph.
        tokens_per_expert: ``LongTensor[E]`` of the last forward, global expert ids, before drops.
        dropped_tokens: token->expert assignments dropped by capacity in the last forward (expert
            choice: routed tokens that no expert took).
        routed_tokens: tokens routed in the last forward (padding excluded).
        assignments: the unit ``dropped_tokens`` counts, for the last forward (see :attr:`assignments`).
        forward_count: forwards run so far (a plain int): a caller that remembers it knows whether
            the layer ran since, without holding on to the last forward's tensors.
        dispatcher: the :class:`~lightning_moe.nn.dispatch.ExpertDispatcher` that runs the experts
            (:class:`~lightning_moe.nn.dispatch.LocalDispatcher` unless a strategy installed another
            through :attr:`expert_dispatcher`).
        count_reduction: the :class:`~lightning_moe.nn.reduce.CountReduction` that sums routing counts
            over ranks for the global and sequence scopes (local unless a strategy installed another).
        global_tokens_per_expert: ``LongTensor[E]`` of the last forward: ``tokens_per_expert`` summed
            over the :attr:`reduced_over` ranks the losses were formed on (equal to it when nothing was reduced).
        reduced_over: how many ranks' counts ``global_tokens_per_expert`` sums (1: this rank's own). Bias
            balancing reads it to skip its own all-reduce.

    Example:
        >>> layer = MoE(dim=16, num_experts=4, top_k=2)
        >>> layer(torch.randn(2, 3, 16)).shape
        torch.Size([2, 3, 16])
        >>> int(layer.tokens_per_expert.sum())
        12
    """
    # Per-forward stats, registered as non-persistent buffers in __init__ (annotated for type checkers).
    tokens_per_expert: Tensor
    dropped_tokens: Tensor
    routed_tokens: Tensor
    router_entropy: Tensor
    global_tokens_per_expert: Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        hidden_dim: int | None = None,
        activation: str = "gelu",
        router: str = "token_choice",
        score_func: str = "softmax",
        capacity_factor: float | None = None,
        num_shared_experts: int = 0,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        router_jitter: float = 0.0,
        normalize_weights: bool = True,
        expert: nn.Module | None = None,
        bias: bool = False,
        check_finite: bool = False,
        router_bias: bool = False,
        use_expert_bias: bool = False,
        num_groups: int = 1,
        top_groups: int = 1,
        routed_scaling_factor: float = 1.0,
        shared_expert_gate: bool = False,
        shared_expert_hidden_dim: int | None = None,
        swiglu_alpha: float | None = None,
        swiglu_limit: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        aux_loss_scope: str = "global",
    ) -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None and isinstance(dim, int) else hidden_dim
        name = type(self).__name__
        validate_args(name, dim, num_experts, top_k, hidden_dim, activation, router, score_func, capacity_factor,
                      num_shared_experts, aux_loss_coef, z_loss_coef, bias_update_rate, router_jitter, expert)
        validate_published_options(name, num_experts, top_k, activation, router, score_func, num_shared_experts,
                                   use_expert_bias, num_groups, top_groups, routed_scaling_factor, shared_expert_gate,
                                   shared_expert_hidden_dim, swiglu_alpha, swiglu_limit)
        check_scope(aux_loss_scope, router, type(self).__name__)
        self.aux_loss_scope = aux_loss_scope
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.router_type = router
        self.score_func = score_func
        self.capacity_factor = capacity_factor
        self.num_shared_experts = num_shared_experts
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.bias_update_rate = bias_update_rate
        self.router_jitter = router_jitter
        self.normalize_weights = normalize_weights
        self.check_finite = check_finite
        self.router_bias = router_bias
        self.use_expert_bias = use_expert_bias
        self.num_groups = num_groups
        self.top_groups = top_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.shared_expert_gate = shared_expert_gate
        self.shared_expert_hidden_dim = (shared_expert_hidden_dim or hidden_dim * num_shared_experts
                                         if num_shared_experts else None)
        self.layer_name: str | None = None  # set by MoELightningModule to the module path
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        swiglu: dict[str, Any] = {"swiglu_alpha": swiglu_alpha, "swiglu_limit": swiglu_limit}

        if router == "token_choice":
            self.router: nn.Module = TokenChoiceRouter(
                dim, num_experts, top_k, score_func, normalize_weights, router_jitter, bias_update_rate,
                bias=router_bias, use_expert_bias=use_expert_bias, num_groups=num_groups, top_groups=top_groups,
                routed_scaling_factor=routed_scaling_factor, **factory
            )
        else:
            self.router = ExpertChoiceRouter(
                dim, num_experts, top_k, capacity_factor or 1.0, score_func, router_jitter, bias=router_bias, **factory
            )
        if expert is None:
            self.experts: nn.Module = GroupedExperts(num_experts, dim, hidden_dim, activation, bias=bias, **swiglu,
                                                     **factory)
        else:
            self.experts = TemplateExperts(expert, num_experts)
        self.shared_experts = (
            GroupedExperts(1, dim, cast(int, self.shared_expert_hidden_dim), activation, bias=bias, **swiglu, **factory)
            if num_shared_experts
            else None
        )
        self.shared_gate = nn.Linear(dim, 1, bias=False, **factory) if shared_expert_gate else None
        # Replaced from outside (expert_dispatcher) by the expert-parallel strategy; the layer knows no process group.
        self.dispatcher: ExpertDispatcher = LocalDispatcher()
        # Replaced from outside (count_reduction) by the strategy, for the global and sequence loss scopes.
        self._count_reduction: CountReduction = LocalCountReduction()
        self.reduced_over = 1
        # A 0-dim CPU tensor, not an int: torch.compile would guard on an int attribute (and recompile every
        # forward); it counts a tensor inside the graph. Read it as an int through forward_count.
        self._forwards = torch.zeros((), dtype=torch.long, device="cpu")

        for stat, shape, stat_dtype in (("tokens_per_expert", (num_experts,), torch.long),
                                        ("dropped_tokens", (), torch.long), ("routed_tokens", (), torch.long),
                                        ("router_entropy", (), torch.float32),
                                        ("global_tokens_per_expert", (num_experts,), torch.long)):
            self.register_buffer(stat, torch.zeros(shape, dtype=stat_dtype, device=device), persistent=False)
        self._aux_loss: Tensor | None = None
        self._load_balancing_loss: Tensor | None = None
        self._z_loss: Tensor | None = None
        # A state saved after expert pruning holds fewer experts: loading it shrinks the layer first.
        from lightning_moe.prune import shrink_to_saved_hook  # the expert surgery, which imports this module

        self.register_load_state_dict_pre_hook(shrink_to_saved_hook)

    def extra_repr(self) -> str:
        drop = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        options = [f"{arg}={value!r}" for arg, value, default in (
            ("router_bias", self.router_bias, False), ("use_expert_bias", self.use_expert_bias, False),
            ("num_groups", self.num_groups, 1), ("top_groups", self.top_groups, 1),
            ("routed_scaling_factor", self.routed_scaling_factor, 1.0),
            ("shared_expert_gate", self.shared_expert_gate, False)) if value != default]
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, router={self.router_type!r}, "
                f"score_func={self.score_func!r}, {drop}, num_shared_experts={self.num_shared_experts}"
                + "".join(f", {o}" for o in options))

    def __getstate__(self) -> dict:
        # The last forward's losses are non-leaf tensors with a graph: copy.deepcopy and pickle
        # refuse them, so a copy starts as a fresh layer does (losses read 0 until its forward).
        # The forward counter travels as a plain 0 (a copy has run no forward): a tensor made here would die with
        # this dict, and the spawn launcher shares tensors by file descriptors that must outlive the pickling.
        state = self.__dict__.copy()
        state.update(_aux_loss=None, _load_balancing_loss=None, _z_loss=None, _forwards=0)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._forwards = torch.tensor(int(state.get("_forwards", 0)), dtype=torch.long, device="cpu")

    @property
    def forward_count(self) -> int:
        """Forwards run so far (a plain int); compiled forwards count too."""
        return int(self._forwards)

    @property
    def expert_dispatcher(self) -> ExpertDispatcher | None:
        """The dispatcher a strategy installed, or None when the layer runs every expert itself.

        Setting None restores the :class:`~lightning_moe.nn.dispatch.LocalDispatcher`.
        """
        return None if isinstance(self.dispatcher, LocalDispatcher) else self.dispatcher

    @expert_dispatcher.setter
    def expert_dispatcher(self, dispatcher: ExpertDispatcher | None) -> None:
        if dispatcher is not None and not isinstance(dispatcher, ExpertDispatcher):
            raise ValueError(f"{self.display_name}: expert_dispatcher={dispatcher!r} must implement the "
                             "ExpertDispatcher protocol (plan(kept_counts_E) and __call__(x_MD, plan, experts)), "
                             "or be None for local experts")
        self.dispatcher = LocalDispatcher() if dispatcher is None else dispatcher

    @property
    def count_reduction(self) -> CountReduction:
        """How the global/sequence scopes sum counts over ranks (installed from outside; None restores the local)."""
        return self._count_reduction

    @count_reduction.setter
    def count_reduction(self, reduction: CountReduction | None) -> None:
        if reduction is not None and not isinstance(reduction, CountReduction):
            raise ValueError(f"{self.display_name}: count_reduction={reduction!r} must implement the CountReduction "
                             "protocol (size, start(counts_X) and wait(pending_X)), or be None for this rank alone")
        self._count_reduction = LocalCountReduction() if reduction is None else reduction

    @property
    def assignments(self) -> Tensor:
        """Assignments routed in the last forward, the unit of ``dropped_tokens`` (0-dim LongTensor, no sync).

        Token choice: routed tokens x ``top_k`` (token->expert assignments). Expert choice: routed
        tokens (``dropped_tokens`` counts the tokens no expert took).
        """
        per_token = self.top_k if self.router_type == "token_choice" else 1
        return self.routed_tokens * per_token

    @property
    def display_name(self) -> str:
        """``layer_name`` (the module path, set by MoELightningModule), or a short description."""
        return self.layer_name or f"MoE(dim={self.dim}, num_experts={self.num_experts})"

    @property
    def aux_loss(self) -> Tensor:
        """Balancing loss + z-loss of the last forward, coefficients applied (0 before any forward)."""
        return self._aux_loss if self._aux_loss is not None else self._zero()

    @property
    def load_balancing_loss(self) -> Tensor:
        return self._load_balancing_loss if self._load_balancing_loss is not None else self._zero()

    @property
    def z_loss(self) -> Tensor:
        return self._z_loss if self._z_loss is not None else self._zero()

    @property
    def expert_bias(self) -> Tensor | None:
        return getattr(self.router, "expert_bias", None)

    def _zero(self) -> Tensor:
        return torch.zeros((), device=self.tokens_per_expert.device)

    @torch.no_grad()
    def update_expert_bias(self, load: Tensor | None = None) -> None:
        """Aux-loss-free balancing step: ``expert_bias += bias_update_rate * sign(mean(load) - load)``.

        Args:
            load: tokens per expert to balance, ``[num_experts]``; default the last forward's
                ``tokens_per_expert``. :class:`MoELightningModule` passes the counts of the whole
                optimizer step summed over data-parallel ranks.
        """
        if not isinstance(self.router, TokenChoiceRouter):
            raise ValueError(f"{self.display_name}: update_expert_bias needs router='token_choice'")
        self.router.update_expert_bias(self.tokens_per_expert if load is None else load)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Route, run the experts and combine.

        Args:
            x: ``[..., dim]`` floating-point input.
            padding_mask: optional bool ``[...]`` (``x.shape[:-1]``), True marks padding: those tokens
                are not routed, counted or part of the losses, and their routed output is zero.

        Returns:
            ``[..., dim]``, the dtype of the expert computation.
        """
        if not torch.is_floating_point(x):
            raise ValueError(f"{self.display_name}: input dtype {x.dtype} must be floating point; cast with x.float()")
        if x.ndim == 0 or x.shape[-1] != self.dim:
            width = x.shape[-1] if x.ndim else "a 0-dim tensor"
            raise ValueError(f"{self.display_name}: input last dim {width} must equal dim={self.dim}")
        x_TD = x.reshape(-1, self.dim)
        valid_T = None
        if padding_mask is not None:
            if padding_mask.shape != x.shape[:-1]:
                raise ValueError(f"{self.display_name}: padding_mask shape {tuple(padding_mask.shape)} must equal "
                                 f"x.shape[:-1]={tuple(x.shape[:-1])}")
            valid_T = ~padding_mask.reshape(-1).to(torch.bool)

        seq_len = x.shape[-2] if x.ndim >= 2 else 1  # the sequence dim of the sequence scope
        if self.router_type == "token_choice":
            out_TD = self._token_choice(x_TD, valid_T, seq_len)
        else:
            out_TD = self._expert_choice(x_TD, valid_T)
        if self.shared_experts is not None:
            out_TD = out_TD + self._shared(x_TD)
        out_TD = recompute.after_forward(self, out_TD, self.aux_loss)  # reentrant activation checkpointing
        self._forwards.add_(1)
        return out_TD.reshape(x.shape)

    def _shared(self, x_TD: Tensor) -> Tensor:
        """Shared experts on every token, scaled by their sigmoid gate when ``shared_expert_gate``."""
        y_TD = cast(GroupedExperts, self.shared_experts)(x_TD, [x_TD.shape[0]])  # not None: forward checked
        if self.shared_gate is not None:
            y_TD = torch.sigmoid(self.shared_gate(x_TD)) * y_TD
        return y_TD

    def _token_choice(self, x_TD: Tensor, valid_T: Tensor | None, seq_len: int) -> Tensor:
        num_tokens = x_TD.shape[0]
        routing = self.router(x_TD, valid_T)
        self._check_finite(routing.logits_TE)
        num_routed = num_tokens if valid_T is None else valid_T.sum()
        capacity = None
        if self.capacity_factor is not None:
            capacity = MF.expert_capacity(self.capacity_factor, num_routed, self.top_k, self.num_experts)
        # 1. Sort the T*K assignments (k-major) by expert; capacity drops overflow, deterministically.
        order_N, _, counts_E, kept_counts_E = MF.sort_by_expert(routing.top_ids_TK, self.num_experts, capacity)
        # Global/sequence scopes: the counts' sum over ranks travels while the experts run (waited in _set_losses).
        pending_X = start_count_reduction(self._count_reduction, self._scope, counts_E, num_routed, valid_T, seq_len)
        # 2. Each assignment's token (flat index n = k*T + t) and weight, in that order: kept ones first, by expert.
        token_N = order_N % num_tokens if num_tokens else order_N
        weights_N = routing.top_weights_TK.t().reshape(-1).index_select(0, order_N)
        # 3. Experts, and the weighted sum back per token (dropped assignments contribute nothing).
        out_TD = self._run_experts(x_TD, token_N, weights_N, kept_counts_E)

        probs_TE = routing.scores_TE
        if self.score_func == "sigmoid":
            probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        self._set_losses(routing.logits_TE, valid_T, counts_E, num_routed, pending_X,
                         probs_TE=probs_TE, top_ids_TK=routing.top_ids_TK, seq_len=seq_len)
        self._record(counts_E, counts_E.sum() - kept_counts_E.sum(), num_routed, routing.scores_TE, valid_T)
        return out_TD

    def _expert_choice(self, x_TD: Tensor, valid_T: Tensor | None) -> Tensor:
        num_tokens = x_TD.shape[0]
        routing = self.router(x_TD, valid_T)
        self._check_finite(routing.logits_TE)
        token_M = routing.token_ids_EC.reshape(-1)
        weights_M = routing.weights_EC.reshape(-1)
        capacity = routing.token_ids_EC.shape[1]
        counts_E = routing.chosen_EC.sum(dim=1)
        num_routed = num_tokens if valid_T is None else valid_T.sum()
        pending_X = start_count_reduction(self._count_reduction, self._scope, counts_E, num_routed, valid_T, 1)
        # Every expert fills its capacity (known on the host): a local plan needs no sync; an
        # expert-parallel one still exchanges counts (ranks' capacities differ with their token counts).
        kept_counts_E = torch.full_like(counts_E, capacity)
        out_TD = self._run_experts(x_TD, token_M, weights_M, kept_counts_E, host_counts=[capacity] * self.num_experts)

        with torch.no_grad():
            taken_T = torch.zeros(num_tokens, device=x_TD.device, dtype=torch.long)
            taken_T.index_add_(0, token_M, routing.chosen_EC.reshape(-1).long())
            untaken_T = taken_T == 0 if valid_T is None else (taken_T == 0) & valid_T
        self._set_losses(routing.logits_TE, valid_T, counts_E, num_routed, pending_X)
        self._record(counts_E, untaken_T.sum(), num_routed, routing.scores_TE, valid_T)
        return out_TD

    def _run_experts(self, x_TD: Tensor, token_N: Tensor, weights_N: Tensor, kept_counts_E: Tensor,
                     host_counts: list[int] | None = None) -> Tensor:
        """Rows ``token_N`` (``kept_counts_E[e]`` per expert, dropped ones last) through the experts, combined per
        token; ``host_counts``: ``kept_counts_E`` when known on the host (expert choice)."""
        if isinstance(self.dispatcher, LocalDispatcher):
            # Local: gather, experts and combine in one call (fused expert by expert for GroupedExperts, nn/ops).
            return self.dispatcher.routed(x_TD, token_N, weights_N, kept_counts_E, self.experts, host_counts)
        # NOTE: the one host sync of the layer: per-expert counts size the expert GEMMs (an expert-parallel
        # dispatcher exchanges counts with its peers in the same sync).
        plan = self.dispatcher.plan(kept_counts_E, host_counts=host_counts)
        token_M, weights_M = token_N[: plan.num_sent], weights_N[: plan.num_sent]
        # index_select's backward is one index_add; the fused combine's saves no second [M, D] copy (nn/ops).
        y_MD = self.dispatcher(x_TD.index_select(0, token_M), plan, self.experts)
        return weighted_combine(y_MD, weights_M, token_M, x_TD.shape[0])

    def _check_finite(self, logits_TE: Tensor) -> None:
        if self.check_finite and not bool(torch.isfinite(logits_TE).all()):
            raise FloatingPointError(
                f"{self.display_name}: router logits are not finite (NaN/inf in the input or router weights); "
                "check the layer input, lower the learning rate, or use NonFiniteGuard"
            )

    @property
    def _scope(self) -> str:
        # This rank's losses in eval mode (evaluation never waits for peers) and when nothing uses the sums
        # (no loss, no bias balancing: the losses are 0 either way), so that neither costs a collective.
        used = self.aux_loss_coef > 0 or self.z_loss_coef > 0 or self.bias_update_rate > 0
        return self.aux_loss_scope if self.training and used else "local"

    def _set_losses(self, logits_TE: Tensor, valid_T: Tensor | None, counts_E: Tensor, num_routed: Tensor | int,
                    pending_X: Tensor | None, probs_TE: Tensor | None = None, top_ids_TK: Tensor | None = None,
                    seq_len: int = 1) -> None:
        """Form this forward's losses by scope (coefficients applied) and record the counts they used."""
        losses = scoped_losses(self._scope, self._count_reduction, pending_X, logits_TE, valid_T, counts_E, num_routed,
                               self.top_k, probs_TE, top_ids_TK, seq_len)
        z_loss = self.z_loss_coef * losses.z
        balance_loss = z_loss * 0 if losses.balance is None else self.aux_loss_coef * losses.balance
        self._load_balancing_loss, self._z_loss, self._aux_loss = balance_loss, z_loss, balance_loss + z_loss
        with torch.no_grad():
            self.global_tokens_per_expert.copy_(losses.global_counts_E)
        self.reduced_over = losses.reduced_over

    @torch.no_grad()
    def _record(self, counts_E: Tensor, dropped: Tensor, num_routed, scores_TE: Tensor, valid_T) -> None:
        self.tokens_per_expert.copy_(counts_E)
        self.dropped_tokens.copy_(dropped)
        self.routed_tokens.fill_(num_routed) if isinstance(num_routed, int) else self.routed_tokens.copy_(num_routed)
        self.router_entropy.copy_(MF.routing_entropy(scores_TE, valid_T))


def find_moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    """Every :class:`MoE` layer under ``module`` (itself included) with its module path.

    The one way the package finds layers (strategy, callbacks, metrics, checkpoints, planning).

    Returns:
        ``[(path, layer), ...]`` in ``named_modules()`` order (``""`` is ``module`` itself).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), MoE(dim=8, num_experts=2))
        >>> [(path, type(layer).__name__) for path, layer in find_moe_layers(model)]
        [('1', 'MoE')]
    """
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]
