"""The conversions behind :func:`lightning_moe.upcycle`: one dense block -> one MoE layer, checked on a probe.

Each converter method takes a matched module and returns its replacement plus the report entry, or raises
:class:`Skip` with the reason. Also here: the torch transformer layers whose feed-forward block runs through
``self.moe`` (they never take torch's fused inference fast path, which would bypass the experts).
"""


from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe import _compat
from lightning_moe.nn.experts import GroupedExperts, TemplateExperts
from lightning_moe.nn.moe import MoE, find_moe_layers

MLP_NAMES = ("mlp", "ffn", "feed_forward")
# (first, second) projections of a two-layer MLP; (gate, up, down) projections of a SwiGLU MLP.
MLP_PAIRS = (("fc1", "fc2"), ("c_fc", "c_proj"), ("w1", "w2"))
SWIGLU_TRIPLES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


@dataclass
class UpcycledModule:
    """One converted block.

    Attributes:
        name: qualified module name in the model (``""`` is the root).
        kind: ``"encoder_layer" | "decoder_layer" | "mlp" | "swiglu_mlp" | "template"``.
        dim: model width.
        hidden_dim: expert hidden width (None for template experts).
        activation: expert activation (None for template experts).
        params_before: parameters of the dense block.
        params_after: parameters of the MoE (router, all experts, shared experts).
        active_params: parameters one token touches (router, ``top_k`` experts, shared experts).
    """

    name: str
    kind: str
    dim: int
    hidden_dim: int | None
    activation: str | None
    params_before: int
    params_after: int
    active_params: int




# --------------------------------------------------------------------------------------------------
# Transformer layers whose feed-forward block runs through `self.moe`.


class MoETransformerEncoderLayer(nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` whose feed-forward block is ``self.moe`` (made by :func:`upcycle`).

    ``activation_relu_or_gelu = 0`` makes torch's fused inference kernel ineligible, so eval mode runs the
    MoE too. The dropout between the dense block's two linears has no counterpart in the experts.
    """

    moe: MoE

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.moe(x))


class MoETransformerDecoderLayer(nn.TransformerDecoderLayer):
    """An ``nn.TransformerDecoderLayer`` whose feed-forward block is ``self.moe`` (made by :func:`upcycle`)."""

    moe: MoE

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self.moe(x))


_LAYER_CLASSES = {nn.TransformerEncoderLayer: MoETransformerEncoderLayer,
                  nn.TransformerDecoderLayer: MoETransformerDecoderLayer}


@functools.cache
def _moe_layer_class(cls: type) -> type:
    if cls in _LAYER_CLASSES:
        return _LAYER_CLASSES[cls]
    base = nn.TransformerEncoderLayer if issubclass(cls, nn.TransformerEncoderLayer) else nn.TransformerDecoderLayer
    # A user subclass keeps its own methods; only the feed-forward block changes. (Not picklable: dynamic.)
    return type(f"MoE{cls.__name__}", (cls,), {_compat.FF_BLOCK: getattr(_LAYER_CLASSES[base], _compat.FF_BLOCK),
                                               "__module__": cls.__module__})


class _FeedForward(nn.Module):
    """``linear2(activation(linear1(x)))``: template expert for a layer whose activation has no stacked form."""

    def __init__(self, linear1: nn.Linear, activation: Callable[[Tensor], Tensor], linear2: nn.Linear) -> None:
        super().__init__()
        self.linear1 = linear1
        self.linear2 = linear2
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.activation(self.linear1(x)))



class Skip(Exception):
    """A matched module that cannot be converted; the message is the reason in the report."""




# --------------------------------------------------------------------------------------------------
# Conversions.


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Converter:
    def __init__(self, num_experts: int, top_k: int, noise: float, moe_kwargs: dict) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise = noise
        self.moe_kwargs = moe_kwargs
        self.notes: list[str] = []  # things the report should say about converted blocks

    def convert(self, name: str, module: nn.Module) -> tuple[nn.Module, UpcycledModule]:
        """Return the replacement (or ``module`` itself when converted in place) and its report entry."""
        if _is_meta(module):
            raise Skip("parameters are on the meta device; materialise the dense weights first")
        if find_moe_layers(module):
            raise Skip("already upcycled (it holds an MoE layer)")
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return module, self._transformer_layer(name, module)
        spec = _stacked_spec(module)
        if spec is not None:
            moe = self._stacked(module, spec)
            if moe is not None:
                kind = "swiglu_mlp" if moe.activation == "swiglu" else "mlp"
                self._note_dropout(name, module)
                return moe, self._info(name, kind, module, moe)
        return self._template(name, module)

    # -- nn.TransformerEncoderLayer / nn.TransformerDecoderLayer -------------------------------------

    def _transformer_layer(self, name: str,
                           layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> UpcycledModule:
        cls: type = type(layer)
        base = nn.TransformerEncoderLayer if isinstance(layer, nn.TransformerEncoderLayer) else \
            nn.TransformerDecoderLayer
        if getattr(cls, _compat.FF_BLOCK) is not getattr(base, _compat.FF_BLOCK):
            raise Skip(f"{cls.__name__} overrides _ff_block; pass target= naming its feed-forward module")
        linear1, linear2 = layer.linear1, layer.linear2
        if not (isinstance(linear1, nn.Linear) and isinstance(linear2, nn.Linear)):
            raise Skip("linear1/linear2 are not nn.Linear")
        kind = "encoder_layer" if base is nn.TransformerEncoderLayer else "decoder_layer"
        activation = _activation_name(layer.activation)
        dense = _FeedForward(linear1, layer.activation, linear2)
        if activation is None:  # e.g. a custom callable: experts are copies of linear1 -> activation -> linear2
            moe = self._template_moe(dense, linear1.in_features, linear1.weight)
        else:
            moe = self._new_moe(linear1.in_features, linear1.out_features, activation, linear1.bias is not None,
                                linear1.weight)
            self._copy_stacked(moe, linear1.weight.t(), linear1.bias, linear2.weight.t(), linear2.bias, None)
        info = self._info(name, kind, dense, moe)
        self._note_dropout(name, layer.dropout)  # neither expert kind applies the layer's inner dropout
        del layer.linear1
        del layer.linear2
        layer.moe = moe
        _compat.disable_fused_encoder_fast_path(layer)  # never eligible for torch's fused encoder kernel now
        layer.__class__ = _moe_layer_class(cls)
        return info

    # -- MLPs converted to stacked weights ------------------------------------------------------------

    def _stacked(self, module: nn.Module, spec: dict) -> MoE | None:
        first, down = spec["first"], spec["down"]
        dim, hidden = first.in_features, first.out_features
        bias = first.bias is not None or down.bias is not None or (spec["up"] is not None and spec["up"].bias
                                                                    is not None)
        candidates = ["swiglu"] if spec["up"] is not None else spec["activations"]
        for activation in candidates:
            probe = GroupedExperts(1, dim, hidden, activation, bias=bias, device=first.weight.device,
                                   dtype=first.weight.dtype)
            _fill_stacked(probe, first, spec["up"], down)
            def candidate(x: Tensor, p: GroupedExperts = probe) -> Tensor:
                return p(x.reshape(-1, dim), [x.shape[:-1].numel()]).reshape(x.shape)

            if _same_function(module, candidate, dim, first.weight):
                moe = self._new_moe(dim, hidden, activation, bias, first.weight)
                up_weight = spec["up"].weight.t() if spec["up"] is not None else None
                self._copy_stacked(moe, first.weight.t(), first.bias, down.weight.t(), down.bias, up_weight)
                return moe
        return None

    # -- anything else: template experts --------------------------------------------------------------

    def _template(self, name: str, module: nn.Module) -> tuple[nn.Module, UpcycledModule]:
        dim = _infer_dim(module)
        if dim is None:
            raise Skip("cannot infer the model width (no nn.Linear/LayerNorm/Embedding inside); "
                        "give the module a first nn.Linear or convert it by hand with MoE(expert=...)")
        ref = next(module.parameters(), None)
        if ref is None:
            raise Skip("has no parameters to copy into experts")
        if not _same_function(module, module, dim, ref):  # it must map [..., dim] -> [..., dim]
            raise Skip(f"does not map [..., {dim}] -> [..., {dim}] with a single tensor argument")
        moe = self._template_moe(module, dim, ref)
        return moe, self._info(name, "template", module, moe)

    # -- helpers ---------------------------------------------------------------------------------------

    def _new_moe(self, dim: int, hidden: int, activation: str, bias: bool, ref: Tensor) -> MoE:
        moe = MoE(dim, self.num_experts, self.top_k, hidden_dim=hidden, activation=activation, bias=bias,
                  device=ref.device, dtype=ref.dtype, **self.moe_kwargs)
        self._zero_shared(moe)
        return moe

    def _template_moe(self, dense: nn.Module, dim: int, ref: Tensor) -> MoE:
        # Build with a parameter-free template, then install copies of the dense module (not re-initialised).
        moe = MoE(dim, self.num_experts, self.top_k, expert=nn.Identity(), device=ref.device, dtype=ref.dtype,
                  **self.moe_kwargs)
        experts = TemplateExperts(dense, self.num_experts, reinit=False)
        if self.noise > 0:
            with torch.no_grad():
                for p in experts.parameters():
                    if torch.is_floating_point(p):
                        p.mul_(1 + self.noise * torch.randn_like(p))
        moe.experts = experts
        self._zero_shared(moe)
        return moe

    def _copy_stacked(self, moe: MoE, w1_DH: Tensor, b1_H: Tensor | None, w2_HD: Tensor, b2_D: Tensor | None,
                      w3_DH: Tensor | None) -> None:
        experts = moe.experts
        assert isinstance(experts, GroupedExperts)  # built by _new_moe: stacked experts
        with torch.no_grad():
            for param, dense in ((experts.w1, w1_DH), (experts.w2, w2_HD), (experts.w3, w3_DH),
                                 (experts.b1, b1_H), (experts.b2, b2_D)):
                if param is None:
                    continue
                param.copy_(dense.unsqueeze(0).expand_as(param) if dense is not None else torch.zeros_like(param))
                if self.noise > 0:
                    param.mul_(1 + self.noise * torch.randn_like(param))

    def _note_dropout(self, name: str, dense: nn.Module) -> None:
        # The experts have no dropout: say so when the dense block had one (training only; eval is exact).
        rates = sorted({m.p for m in dense.modules() if isinstance(m, nn.Dropout) and m.p > 0})
        if rates:
            self.notes.append(f"{name or '<root>'}: dropout p={rates} inside the dense block is not applied by the "
                              "experts")

    @staticmethod
    def _zero_shared(moe: MoE) -> None:
        # Shared experts are always on: a zero output projection keeps the converted model equal to the dense one.
        shared = moe.shared_experts
        if shared is not None:
            with torch.no_grad():
                shared.w2.zero_()
                if shared.b2 is not None:
                    shared.b2.zero_()

    def _info(self, name: str, kind: str, dense: nn.Module, moe: MoE) -> UpcycledModule:
        per_expert = num_params(moe.experts) // self.num_experts
        shared = num_params(moe.shared_experts) if moe.shared_experts is not None else 0
        active = num_params(moe.router) + self.top_k * per_expert + shared
        stacked = isinstance(moe.experts, GroupedExperts)
        return UpcycledModule(name=name, kind=kind, dim=moe.dim, hidden_dim=moe.hidden_dim if stacked else None,
                              activation=moe.activation if stacked else None, params_before=num_params(dense),
                              params_after=num_params(moe), active_params=active)


def _stacked_spec(module: nn.Module) -> dict | None:
    """The projections of a recognised MLP, or None. Keys: first (w1 / gate), up (w3 or None), down, activations."""
    children = dict(module.named_children())
    for gate, up, down in SWIGLU_TRIPLES:
        g, u, d = children.get(gate), children.get(up), children.get(down)
        if isinstance(g, nn.Linear) and isinstance(u, nn.Linear) and isinstance(d, nn.Linear):
            # GroupedExperts has no bias for w3: an up projection with a bias goes to template experts.
            if g.weight.shape == u.weight.shape and d.weight.shape == g.weight.t().shape and u.bias is None:
                return {"first": g, "up": u, "down": d, "activations": ["swiglu"]}
    for first, second in MLP_PAIRS:
        a, b = children.get(first), children.get(second)
        if isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and b.weight.shape == a.weight.t().shape:
            return {"first": a, "up": None, "down": b, "activations": _activations_of(children.values())}
    if isinstance(module, nn.Sequential):
        layers = [m for m in module if not isinstance(m, (nn.Dropout, nn.Identity))]
        if (len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[2], nn.Linear)
                and layers[2].weight.shape == layers[0].weight.t().shape):
            name = _activation_name(layers[1])
            if name is not None:
                return {"first": layers[0], "up": None, "down": layers[2], "activations": [name]}
    return None


def _activations_of(children) -> list[str]:
    # An activation module among the children decides; otherwise (F.gelu in forward) try each on a probe.
    names = [_activation_name(m) for m in children if isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU))]
    found = [a for a in names if a is not None]
    return found[:1] if found else ["gelu", "relu", "silu"]


def _activation_name(activation: Any) -> str | None:
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu or (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        return "gelu"
    if activation is F.silu or isinstance(activation, nn.SiLU):
        return "silu"
    return None


def _fill_stacked(experts: GroupedExperts, first: nn.Linear, up: nn.Linear | None, down: nn.Linear) -> None:
    with torch.no_grad():
        experts.w1[0].copy_(first.weight.t())
        experts.w2[0].copy_(down.weight.t())
        if up is not None:
            assert experts.w3 is not None  # an up projection comes with activation="swiglu"
            experts.w3[0].copy_(up.weight.t())
        if experts.b1 is not None:
            experts.b1[0].copy_(first.bias if first.bias is not None else torch.zeros_like(experts.b1[0]))
        if experts.b2 is not None:
            experts.b2[0].copy_(down.bias if down.bias is not None else torch.zeros_like(experts.b2[0]))


def _infer_dim(module: nn.Module) -> int | None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) == 1:
            return sub.normalized_shape[0]
        if isinstance(sub, nn.Conv1d):
            return sub.in_channels
    return None


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


@contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _same_function(dense: nn.Module, candidate: Callable[[Tensor], Tensor], dim: int, ref: Tensor) -> bool:
    """Do ``dense`` and ``candidate`` agree on a probe input ``[2, 3, dim]`` (eval mode, no grad)?"""
    generator = torch.Generator(device=ref.device).manual_seed(0)
    dtype = ref.dtype if torch.is_floating_point(ref) else torch.float32
    x = torch.randn(2, 3, dim, generator=generator, device=ref.device, dtype=torch.float32).to(dtype)
    try:
        with torch.no_grad(), _eval(dense):
            y_ref = dense(x)
            y = candidate(x)
    except Exception:  # noqa: BLE001 - any failure means "not this function"
        return False
    if not isinstance(y_ref, Tensor) or not isinstance(y, Tensor) or y_ref.shape != x.shape or y.shape != x.shape:
        return False
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    scale = 1.0 + float(y_ref.abs().max())
    return bool(torch.isfinite(y).all()) and float((y.float() - y_ref.float()).abs().max()) <= tol * scale
