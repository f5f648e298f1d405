"""One HF sparse MoE block as an :class:`~lightning_moe.MoE`, and back.

:func:`build_block` turns a block that :func:`~lightning_moe.hf.rules.read_block` accepted into an
:class:`HFMoEBlock` holding an ``MoE`` whose tensors are HF's own (see ``layout.py``);
:func:`restore_block` gives the HF block its tensors back from the ``MoE``'s current ones.

Shape legend: B batch, S sequence, D model width, T tokens, K top_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_moe.distributed.expert_parallel import expert_shard
from lightning_moe.hf import layout
from lightning_moe.hf.rules import BlockSpec
from lightning_moe.nn.moe import MoE


@dataclass
class HFBlockState:
    """What :func:`restore_block` needs: the emptied HF block and where each of its tensors went."""

    block: nn.Module
    spec: BlockSpec
    entries: list[layout.Entry]
    router_links: list[tuple[str, str, bool]] = field(default_factory=list)  # (hf path, our path, is buffer)
    output_router_logits: bool | None = None  # the config's value before conversion


class HFMoEBlock(nn.Module):
    """An :class:`~lightning_moe.MoE` in the place of a transformers sparse MoE block.

    Calls like the block it replaced: ``[B, S, D] -> [B, S, D]``, or ``(output, router_scores)`` for
    blocks that return the routing weights too (GPT-OSS). In training it applies the block's input
    jitter (Mixtral's ``router_jitter_noise``: multiplicative noise on the input of router *and*
    experts). The HF block itself is kept outside the module tree, emptied (its tensors are on the
    meta device), for :func:`lightning_moe.to_hf`.

    Attributes:
        moe: the layer (``MoELightningModule``, the ``"moe"`` strategy and the callbacks find it by type).
        hf_block_type: class name of the replaced block.
    """

    def __init__(self, moe: MoE, state: HFBlockState, returns_router_scores: bool) -> None:
        super().__init__()
        self.moe = moe
        self.hf_block_type = type(state.block).__name__
        self.input_jitter = state.spec.input_jitter
        self.returns_router_scores = returns_router_scores
        self.hf_state = state  # a dataclass, not a Module: outside parameters(), state_dict() and .to()
        self._router_scores: Tensor | None = None
        if returns_router_scores:
            moe.router.register_forward_hook(self._keep_router_scores)

    def extra_repr(self) -> str:
        return f"hf_block_type={self.hf_block_type}, input_jitter={self.input_jitter}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_router_scores"] = None  # a tensor with a graph: deepcopy and pickle refuse it
        return state

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = hidden_states
        if self.training and self.input_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        out = self.moe(x)
        if not self.returns_router_scores:
            return out
        scores_TK, self._router_scores = self._router_scores, None
        assert scores_TK is not None  # set by the router's forward hook (_keep_router_scores) inside self.moe(x)
        return out, scores_TK

    def _keep_router_scores(self, router: nn.Module, args, output) -> None:
        self._router_scores = output.top_weights_TK


def _get(root: nn.Module, path: str):
    *parents, name = path.split(".")
    module = root.get_submodule(".".join(parents)) if parents else root
    return module, name


def _take(root: nn.Module, path: str, value: Tensor, buffer: bool = False) -> None:
    module, name = _get(root, path)
    if buffer:
        module._buffers[name] = value
    else:
        module._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)


def _placeholder(tensor: Tensor, buffer: bool) -> Tensor:
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return meta if buffer else nn.Parameter(meta, requires_grad=tensor.requires_grad)


def _router_links(spec: BlockSpec) -> list[tuple[str, str, bool]]:
    r = spec.router_name
    links = [(f"{r}.weight", "router.gate.weight", False)]
    if spec.router.router_bias:
        links.append((f"{r}.bias", "router.gate.bias", False))
    if spec.router.use_expert_bias:
        links.append((f"{r}.e_score_correction_bias", "router.expert_bias", True))
    if spec.shared_gate:
        links.append(("shared_expert_gate.weight", "shared_gate.weight", False))
    return links


def build_block(block: nn.Module, spec: BlockSpec, returns_router_scores: bool, weights: str = "copy",
                **moe_kwargs) -> tuple[HFMoEBlock, int]:
    """Build the ``MoE`` on HF's tensors and empty the HF block.

    Args:
        block: the HF block (left holding meta placeholders).
        spec: what it computes.
        returns_router_scores: the block returns ``(output, router_scores)``.
        weights: ``"copy"`` or ``"view"`` (see :mod:`lightning_moe.hf.layout`).
        moe_kwargs: training-only ``MoE`` options (``aux_loss_coef``, ``z_loss_coef``, ...).

    Returns:
        ``(HFMoEBlock, bytes copied)``.
    """
    e, r = spec.experts, spec.router
    first = getattr(block.experts, "gate_up_proj" if e.has_gate else "up_proj")
    num_shared = 0
    if spec.shared_name is not None and spec.shared_hidden_dim is not None:  # read_shared sets both or neither
        num_shared = spec.shared_hidden_dim // e.hidden_dim if spec.shared_hidden_dim % e.hidden_dim == 0 else 1
    moe = MoE(e.dim, e.num_experts, r.top_k, hidden_dim=e.hidden_dim, activation=e.activation, score_func=r.score_func,
              normalize_weights=r.normalize_weights, router_bias=r.router_bias, use_expert_bias=r.use_expert_bias,
              num_groups=r.num_groups, top_groups=r.top_groups, routed_scaling_factor=r.routed_scaling_factor,
              num_shared_experts=num_shared, shared_expert_hidden_dim=spec.shared_hidden_dim,
              shared_expert_gate=spec.shared_gate, bias=e.has_bias, swiglu_alpha=e.swiglu_alpha,
              swiglu_limit=e.swiglu_limit, device="meta", dtype=first.dtype, **moe_kwargs)
    entries = layout.expert_entries(e) + (layout.shared_entries(spec.shared_name) if spec.shared_name else [])
    copied = 0
    for entry in entries:
        module, name = _get(block, entry.hf_name)
        hf = getattr(module, name)
        tensors, nbytes = layout.hf_to_ours(hf, entry, weights)
        copied += nbytes
        for path, tensor in zip(entry.ours, tensors, strict=True):
            _take(moe, path, nn.Parameter(tensor, requires_grad=hf.requires_grad))
        _take(block, entry.hf_name, _placeholder(hf, buffer=False))
    links = _router_links(spec)
    for hf_path, our_path, buffer in links:
        module, name = _get(block, hf_path)
        hf = getattr(module, name)
        _take(moe, our_path, hf, buffer)  # the same Parameter / buffer object
        _take(block, hf_path, _placeholder(hf, buffer), buffer)
    device = first.device
    for module in moe.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:  # routing stats: zeros, as a fresh layer has them
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    left = [name for name, p in moe.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"from_hf: no HF tensor for {left} of {type(block).__name__}")
    state = HFBlockState(block, spec, entries, links)
    return HFMoEBlock(moe, state, returns_router_scores), copied


def restore_block(wrapper: HFMoEBlock) -> tuple[nn.Module, int]:
    """Give the HF block its tensors back from the ``MoE``'s current ones.

    Returns:
        ``(HF block, bytes copied)``: zero when our tensors still share HF's storage in its layout.
    """
    moe, state = wrapper.moe, wrapper.hf_state
    if expert_shard(moe) is not None:
        raise ValueError(f"to_hf: layer {moe.layer_name or wrapper.hf_block_type!r} is sharded over an expert-parallel "
                         "group (only this rank's experts are here); convert after Trainer.fit, which gathers the "
                         "experts back, or load the full checkpoint into a converted model first")
    block, copied = state.block, 0
    for entry in state.entries:
        module, name = _get(block, entry.hf_name)
        shape = getattr(module, name).shape
        ours = [_get(moe, path)[0]._parameters[_get(moe, path)[1]] for path in entry.ours]
        tensor, zero_copy = layout.ours_to_hf(ours, entry, shape)
        if not zero_copy:
            copied += tensor.numel() * tensor.element_size()
        _take(block, entry.hf_name, nn.Parameter(tensor, requires_grad=ours[0].requires_grad))
    for hf_path, our_path, buffer in state.router_links:
        module, name = _get(moe, our_path)
        _take(block, hf_path, module._buffers[name] if buffer else module._parameters[name], buffer)
    block.train(wrapper.training)
    return block, copied
