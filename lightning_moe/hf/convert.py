"""``from_hf`` / ``to_hf``: transformers sparse MoE blocks to :class:`~lightning_moe.MoE` and back, in place.

See :mod:`lightning_moe.hf` for the whole story (which blocks, weight layouts, aux-loss semantics).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_moe.hf import _compat
from lightning_moe.hf.block import HFMoEBlock, build_block, restore_block
from lightning_moe.hf.layout import WEIGHTS
from lightning_moe.hf.rules import BlockSpec, NotConvertible, looks_like_moe, read_block
from lightning_moe.nn.moe import MoE

AUX_LOSSES = ("lightning_moe", "hf", "none")
DEFAULT_AUX_LOSS_COEF = 1e-2  # MoE's default, for models whose config has no router_aux_loss_coef


@dataclass
class ConvertedBlock:
    """One converted (or restored) block of a :class:`HFConversionReport`."""

    path: str
    block_type: str
    routing: str
    experts: str
    params: int
    copied_bytes: int


@dataclass
class HFConversionReport:
    """What :func:`from_hf` or :func:`to_hf` did.

    Attributes:
        direction: ``"from_hf"`` or ``"to_hf"``.
        blocks: the converted (restored) blocks, in module order.
        skipped: ``(path, block type, reason)`` of MoE-like blocks left alone (``strict=False`` only).
        aux_loss: the balancing-loss semantics chosen (``from_hf``).
        aux_loss_coef: our per-layer balancing-loss coefficient (0 unless ``aux_loss="lightning_moe"``).
        z_loss_coef: our per-layer router z-loss coefficient.
        total_params: parameters of the whole model after the call.
    """

    direction: str
    blocks: list[ConvertedBlock] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    aux_loss: str | None = None
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    total_params: int = 0

    @property
    def moe_params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def copied_bytes(self) -> int:
        return sum(b.copied_bytes for b in self.blocks)

    def __str__(self) -> str:
        verb = "->" if self.direction == "from_hf" else "<-"
        kinds = sorted({b.block_type for b in self.blocks})
        lines = [f"{self.direction}: {len(self.blocks)} block(s) {', '.join(kinds)} {verb} MoE; "
                 f"{self.moe_params:,} of {self.total_params:,} parameters in MoE layers; "
                 f"{self.copied_bytes:,} bytes copied (once; nothing is duplicated)"]
        if self.blocks:
            lines.append(f"  routing: {self.blocks[0].routing}; experts: {self.blocks[0].experts}")
        if self.aux_loss is not None:
            lines.append(f"  aux loss: {self.aux_loss} (per-layer aux_loss_coef={self.aux_loss_coef:g}, "
                         f"z_loss_coef={self.z_loss_coef:g})")
        lines += [f"  skipped {path} ({kind}): {reason}" for path, kind, reason in self.skipped]
        return "\n".join(lines)


def _hf_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and hasattr(config, "output_router_logits"):
            return config
    return None


def find_blocks(model: nn.Module, strict: bool = True) -> tuple[list[tuple[str, nn.Module, BlockSpec]], list]:
    """Every convertible block with its spec, and the MoE-like blocks that are not convertible.

    Raises:
        ValueError: (``strict``) for the first MoE-like block that breaks the convention, naming its type.
    """
    found, skipped = [], []
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in claimed):
            continue
        if isinstance(module, (MoE, HFMoEBlock)):
            claimed.append(path)
            continue
        if not path or not looks_like_moe(module):
            continue
        claimed.append(path)
        try:
            found.append((path, module, read_block(module)))
        except NotConvertible as error:
            if strict:
                raise ValueError(f"from_hf: cannot convert {path!r}: {error}") from None
            skipped.append((path, type(module).__name__, str(error)))
    return found, skipped


def _returns_tuple(block: nn.Module, dim: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Run the block on one token: does it return ``(output, router_scores)``?"""
    was_training = block.training
    try:
        with torch.no_grad():
            return isinstance(block.eval()(torch.zeros(1, 1, dim, device=device, dtype=dtype)), tuple)
    except Exception as error:  # e.g. an experts implementation that cannot run here in this dtype
        raise ValueError(f"from_hf: {type(block).__name__} does not run on one {dtype} token here ({error}); "
                         "convert with verify=True (it probes a float32 copy instead)") from error
    finally:
        block.train(was_training)


def verify_block(block: nn.Module, spec: BlockSpec, path: str, weights: str = "copy") -> tuple[float, bool]:
    """Compare a float32 copy of ``block`` (random router weights) with its conversion on random tokens.

    Returns:
        ``(difference, returns_tuple)``: the largest absolute difference relative to the output's
        largest magnitude, and whether the block returns ``(output, router_scores)``.

    Raises:
        ValueError: when they differ by more than 1e-5 (relative).
    """
    probe = copy.deepcopy(block).float().eval()
    router = getattr(probe, spec.router_name)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("weight", "bias", "e_score_correction_bias"):
            tensor = getattr(router, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (0.2 if name != "weight" else 1.0))
        x = torch.randn(2, 24, spec.experts.dim, generator=generator).to(router.weight.device)
        x = x * 3 / spec.experts.dim ** 0.5
        expected = probe(x)
        returns_tuple = isinstance(expected, tuple)
        expected = expected[0] if returns_tuple else expected
        converted, _ = build_block(probe, spec, returns_tuple, weights, aux_loss_coef=0.0, z_loss_coef=0.0)
        got = converted.eval()(x)
        got = got[0] if isinstance(got, tuple) else got
    diff = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
    if not diff <= 1e-5:
        raise ValueError(f"from_hf: {path!r} ({type(block).__name__}) converted computes something else: relative "
                         f"difference {diff:.3g} on a float32 probe; the block does not follow the v5 convention")
    return diff, returns_tuple


def _describe(spec: BlockSpec) -> tuple[str, str]:
    r, e = spec.router, spec.experts
    routing = f"top-{r.top_k} of {r.num_experts}, {r.score_func}"
    routing += ", renormalised" if r.normalize_weights and r.score_func != "softmax_topk" else ""
    routing += ", router bias" if r.router_bias else ""
    routing += ", score-correction bias" if r.use_expert_bias else ""
    routing += f", {r.top_groups} of {r.num_groups} groups" if r.num_groups > 1 else ""
    routing += f", scaled x{r.routed_scaling_factor:g}" if r.routed_scaling_factor != 1.0 else ""
    experts = f"{e.activation} {e.dim}->{e.hidden_dim}" + (" with biases" if e.has_bias else "")
    experts += f" + shared expert {spec.shared_hidden_dim}" if spec.shared_name else ""
    experts += " (sigmoid-gated)" if spec.shared_gate else ""
    return routing, experts


def _aux_coefficients(config, aux_loss: str, aux_loss_coef, z_loss_coef, top_k: int, num_layers: int):
    if aux_loss != "lightning_moe":
        return 0.0, 0.0
    if aux_loss_coef is None:
        hf_coef = getattr(config, "router_aux_loss_coef", None)
        # HF: coef * E * sum_i f_i P_i pooled over the L layers, k at balance. Ours per layer is 1 at
        # balance; coef * k / L per layer gives the same value at balance and, for layers with similar
        # loads, the same gradient on every router.
        aux_loss_coef = hf_coef * top_k / num_layers if hf_coef is not None else DEFAULT_AUX_LOSS_COEF
    return float(aux_loss_coef), float(z_loss_coef)


def from_hf(model: nn.Module, *, aux_loss: str = "lightning_moe", aux_loss_coef: float | None = None,
            z_loss_coef: float = 0.0, bias_update_rate: float = 0.0, capacity_factor: float | None = None,
            weights: str = "copy", verify: bool = True, strict: bool = True) -> HFConversionReport:
    """Replace every transformers (v5) sparse MoE block of ``model`` by an :class:`~lightning_moe.MoE`, in place.

    The layers compute what the blocks computed (same routing, same weights, no copy kept: HF's
    tensors themselves or one-time copies in our layout that replace them, see ``weights``), so
    logits are unchanged, and train with ``Trainer(strategy="moe")``. :func:`to_hf` puts the HF
    blocks back with the trained weights.

    Args:
        model: a transformers model (or any module holding one), e.g. ``AutoModelForCausalLM.from_config(...)``.
        aux_loss: balancing-loss semantics while converted:
            ``"lightning_moe"``: each layer's Switch loss (``E * sum_i f_i P_i``, 1 at balance), added by
            :class:`~lightning_moe.MoELightningModule`; HF's own loss is switched off
            (``config.output_router_logits=False``) so it is not added twice.
            ``"hf"``: exactly HF's training loss: our layers add nothing, ``config.output_router_logits``
            is set and the model's ``forward(labels=...)`` adds ``router_aux_loss_coef`` times HF's
            pooled loss, computed from our routers' logits.
            ``"none"``: no balancing loss.
        aux_loss_coef: ``"lightning_moe"`` only: per-layer coefficient. Default
            ``config.router_aux_loss_coef * top_k / num_layers`` (same value at balance and about the same
            gradient as HF's pooled loss), or 1e-2 when the config has none.
        z_loss_coef: ``"lightning_moe"`` only: router z-loss coefficient (HF models have none: default 0).
        bias_update_rate: > 0 continues aux-loss-free balancing of the score-correction bias
            (DeepSeek-V3 style blocks only: others have nowhere to save the bias).
        capacity_factor: None keeps the blocks dropless (as HF); a float makes the layers drop overflow.
        weights: ``"copy"`` (default): expert weights are copied once into our contiguous layout and HF's
            tensors released (faster training); ``"view"``: our expert weights are views of HF's storage,
            nothing copied (GPT-OSS's interleaved gate/up excepted), each backward pays a transposing
            gradient copy. Details and measurements in :mod:`lightning_moe.hf.layout`.
        verify: check the first block of each type against a float32 copy of it (random router weights
            and tokens, one block copied transiently); False skips the copy (e.g. for a huge block).
        strict: raise on an MoE-like block that does not follow the convention; False skips it and lists
            it in the report.

    Returns:
        An :class:`HFConversionReport`.

    Raises:
        ImportError: transformers >= 5 is not installed (the message says how to install it).
        ValueError: no MoE block, an unknown MoE block type (named), a model already converted, or bad
            arguments.
    """
    _compat.require_transformers("lightning_moe.from_hf")
    if aux_loss not in AUX_LOSSES:
        raise ValueError(f"from_hf: aux_loss={aux_loss!r} must be one of {AUX_LOSSES}")
    if weights not in WEIGHTS:
        raise ValueError(f"from_hf: weights={weights!r} must be one of {WEIGHTS}")
    for arg, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
        if value is not None and aux_loss != "lightning_moe" and value != 0:
            raise ValueError(f"from_hf: {arg}={value} needs aux_loss='lightning_moe' (aux_loss={aux_loss!r})")
    if any(isinstance(m, HFMoEBlock) for m in model.modules()):
        raise ValueError(f"from_hf: {type(model).__name__} is already converted (it holds HFMoEBlock layers); "
                         "call lightning_moe.to_hf(model) first to convert it again")
    blocks, skipped = find_blocks(model, strict)
    if not blocks:
        why = f" ({len(skipped)} MoE-like block(s) skipped)" if skipped else ""
        raise ValueError(f"from_hf: {type(model).__name__} has no sparse MoE block following the transformers v5 "
                         f"convention (a *TopKRouter gate + an *Experts bank){why}")
    if bias_update_rate > 0:
        plain = [p for p, _, s in blocks if not s.router.use_expert_bias]
        if plain:
            raise ValueError(f"from_hf: bias_update_rate={bias_update_rate} needs blocks with a score-correction bias "
                             f"(DeepSeek-V3 style); {plain[0]!r} has none to save it in")
    config = _hf_config(model)
    top_k = blocks[0][2].router.top_k
    aux_coef, z_coef = _aux_coefficients(config, aux_loss, aux_loss_coef, z_loss_coef, top_k, len(blocks))
    moe_kwargs = dict(aux_loss_coef=aux_coef, z_loss_coef=z_coef, bias_update_rate=bias_update_rate,
                      capacity_factor=capacity_factor)

    records = _compat.records_router_logits(model)
    if aux_loss == "hf" and not records:
        raise ValueError(f"from_hf: aux_loss='hf' needs a model that records router_logits (a transformers MoE "
                         f"model with output_router_logits); {type(model).__name__} does not: use "
                         "aux_loss='lightning_moe'")
    if records:
        _compat.install_recording_hooks(model)
    report = HFConversionReport("from_hf", skipped=skipped, aux_loss=aux_loss, aux_loss_coef=aux_coef,
                                z_loss_coef=z_coef)
    returns_tuple: dict[type, bool] = {}  # per block type, from the verification run or a one-token run
    original_flag = getattr(config, "output_router_logits", None)
    for path, block, spec in blocks:
        if type(block) not in returns_tuple:
            if verify:
                returns_tuple[type(block)] = verify_block(block, spec, path, weights)[1]
            else:
                first = next(iter(block.get_submodule("experts").parameters()))
                returns_tuple[type(block)] = _returns_tuple(block, spec.experts.dim, first.device, first.dtype)
        wrapper, copied = build_block(block, spec, returns_tuple[type(block)], weights, **moe_kwargs)
        wrapper.train(block.training)
        wrapper.hf_state.output_router_logits = original_flag
        wrapper.moe.layer_name = path
        if records:
            _compat.record_router_logits(wrapper.moe.router)
        parent, name = _parent(model, path)
        setattr(parent, name, wrapper)
        routing, experts = _describe(spec)
        report.blocks.append(ConvertedBlock(path, type(block).__name__, routing, experts,
                                            sum(p.numel() for p in wrapper.parameters()), copied))
    if config is not None and hasattr(config, "output_router_logits"):
        config.output_router_logits = aux_loss == "hf"
    report.total_params = sum(p.numel() for p in model.parameters())
    return report


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def to_hf(model: nn.Module) -> HFConversionReport:
    """Put the transformers blocks back, holding the ``MoE`` layers' current (trained) weights, in place.

    Afterwards ``model.save_pretrained(dir)`` writes a checkpoint that
    ``AutoModelForCausalLM.from_pretrained(dir)`` loads to the same logits. Tensors still shared with
    HF's layout go back without a copy; others (experts regathered by the ``"moe"`` strategy, GPT-OSS's
    de-interleaved ``gate_up_proj``) are assembled once. ``config.output_router_logits`` is restored.

    Raises:
        ValueError: when ``model`` holds no converted block, or a layer is sharded over an
            expert-parallel group (convert after ``Trainer.fit``, or from a full checkpoint).
    """
    wrappers = [(path, m) for path, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    if not wrappers:
        raise ValueError(f"to_hf: {type(model).__name__} holds no block converted by lightning_moe.from_hf")
    report = HFConversionReport("to_hf")
    for path, wrapper in wrappers:
        block, copied = restore_block(wrapper)
        routing, experts = _describe(wrapper.hf_state.spec)
        parent, name = _parent(model, path)
        setattr(parent, name, block)
        report.blocks.append(ConvertedBlock(path, type(block).__name__, routing, experts,
                                            sum(p.numel() for p in block.parameters()), copied))
    config = _hf_config(model)
    flag = wrappers[0][1].hf_state.output_router_logits
    if config is not None and flag is not None:
        config.output_router_logits = flag
    report.total_params = sum(p.numel() for p in model.parameters())
    return report
