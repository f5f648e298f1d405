"""Expert weights between transformers' stacked layout and :class:`GroupedExperts`', without copies where views do.

transformers (v5) stores ``gate_up_proj [E, 2H, D]`` and ``down_proj [E, D, H]`` (``nn.Linear``'s
``[out, in]`` per expert), or ``[E, D, 2H]`` / ``[E, H, D]`` when ``is_transposed`` (GPT-OSS), with
gate and up either concatenated (``[gate; up]``) or interleaved (``g0, u0, g1, u1, ...``, GPT-OSS).
:class:`~lightning_moe.nn.experts.GroupedExperts` computes ``x @ w1[e]`` with ``w1 [E, D, H]``,
``w3 [E, D, H]``, ``w2 [E, H, D]``.

Decision (``from_hf(weights=...)``), measured with ``benchmarks/hf_moe.py``-sized models:

- ``"copy"`` (default): each of our tensors is a one-time contiguous copy in our layout (transposed,
  de-interleaved), unless HF's tensor already is exactly that (GPT-OSS's ``down_proj``); HF's tensor
  is then released (the HF block kept for :func:`ours_to_hf` holds meta placeholders), so nothing
  is duplicated after conversion -- only during it, one tensor at a time. Training runs on
  contiguous weights.
- ``"view"``: no copy at all where a view can serve: each expert's ``[in, out]`` slice needs one unit
  stride, which BLAS reads as a (transposed) operand for free in the forward. That covers the
  concatenated layouts (Mixtral, Qwen, OLMoE, DeepSeek-V3: ``w1 = gate_up_proj[:, :H].mT``) and the
  shared experts' ``nn.Linear`` weights, and an optimizer step on ours *is* a step on HF's tensor.
  The price is in the backward: each expert's weight gradient comes out transposed and is copied into
  the stacked gradient every step (about +16% step time at 64 experts, +2% at 8, on this CPU).
  Interleaved gate/up columns (GPT-OSS, stride 2 in both dims) are copied in either mode.

Router weights and biases, the score-correction bias and the shared-expert gate are HF's own tensors
(the same ``Parameter``/buffer objects) in both modes. :func:`ours_to_hf` reverses the mapping: when
our tensors are still views of one storage in HF's geometry it hands that storage back (zero copy),
otherwise (copies, experts regathered by expert parallelism, a deepcopy) it assembles fresh tensors.

Shape legend (the package's, see :mod:`lightning_moe.nn`): E experts, D model width, H expert hidden width
(2H: fused gate+up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_moe.hf.rules import ExpertsSpec


@dataclass(frozen=True)
class Entry:
    """One HF tensor and the tensors of ours it feeds.

    Attributes:
        hf_name: attribute path on the HF block (``"experts.gate_up_proj"``).
        ours: attribute paths on the ``MoE`` (``("experts.w1", "experts.w3")``).
        split: ``"single" | "concat" | "interleave"``: how ours sit along HF's last dim.
        kind: ``"stacked"`` (3-D, ``[E, out, in]`` unless ``transposed``), ``"bias"`` (2-D ``[E, out]``),
            ``"linear"`` (an ``nn.Linear`` weight ``[out, in]`` that is a one-expert bank of ours).
        transposed: the stacked tensor is already ``[E, in, out]``.
    """

    hf_name: str
    ours: tuple[str, ...]
    split: str = "single"
    kind: str = "stacked"
    transposed: bool = False


def expert_entries(spec: ExpertsSpec) -> list[Entry]:
    """The HF tensors of an experts bank and where each goes."""
    split = "concat" if spec.is_concatenated else "interleave"
    t = spec.is_transposed
    if spec.has_gate:
        entries = [Entry("experts.gate_up_proj", ("experts.w1", "experts.w3"), split, "stacked", t)]
        if spec.has_bias:
            entries.append(Entry("experts.gate_up_proj_bias", ("experts.b1", "experts.b3"), split, "bias"))
    else:
        entries = [Entry("experts.up_proj", ("experts.w1",), "single", "stacked", t)]
        if spec.has_bias:
            entries.append(Entry("experts.up_proj_bias", ("experts.b1",), "single", "bias"))
    entries.append(Entry("experts.down_proj", ("experts.w2",), "single", "stacked", t))
    if spec.has_bias:
        entries.append(Entry("experts.down_proj_bias", ("experts.b2",), "single", "bias"))
    return entries


def shared_entries(shared_name: str) -> list[Entry]:
    """A gate_proj/up_proj/down_proj SwiGLU MLP as a one-expert bank."""
    return [Entry(f"{shared_name}.gate_proj.weight", ("shared_experts.w1",), kind="linear"),
            Entry(f"{shared_name}.up_proj.weight", ("shared_experts.w3",), kind="linear"),
            Entry(f"{shared_name}.down_proj.weight", ("shared_experts.w2",), kind="linear")]


def derive(hf: Tensor, entry: Entry) -> list[Tensor]:
    """Our tensors as views of the HF tensor ``hf`` (no copy; may be strided)."""
    if entry.kind == "linear":
        base = hf.mT.unsqueeze(0)  # [out, in] -> [1, in, out]
    elif entry.kind == "stacked" and not entry.transposed:
        base = hf.mT  # [E, out, in] -> [E, in, out]
    else:
        base = hf
    if entry.split == "single":
        return [base]
    if entry.split == "concat":
        half = base.shape[-1] // 2
        return [base[..., :half], base[..., half:]]
    return [base[..., 0::2], base[..., 1::2]]


def _blas_friendly(t: Tensor) -> bool:
    if t.ndim == 2:  # a stacked bias [E, X]: each expert's row must be contiguous
        return t.stride(-1) == 1 or t.shape[-1] <= 1
    return t.stride(-1) == 1 or t.stride(-2) == 1


WEIGHTS = ("copy", "view")


def hf_to_ours(hf: Tensor, entry: Entry, weights: str = "copy") -> tuple[list[Tensor], int]:
    """Our tensors for one HF tensor: views or one contiguous copy each (see the module docstring).

    Args:
        hf: the HF tensor.
        entry: where it goes.
        weights: ``"copy"``: views only of what is already contiguous; ``"view"``: views wherever BLAS
            can read them.

    Returns:
        ``(tensors, bytes copied)``.
    """
    views = derive(hf.detach(), entry)
    out, copied = [], 0
    for view in views:
        if view.is_contiguous() or (weights == "view" and _blas_friendly(view)):
            out.append(view)
        else:
            out.append(view.contiguous())
            copied += view.numel() * view.element_size()
    return out, copied


def _assemble(ours: list[Tensor], entry: Entry) -> Tensor:
    if entry.split == "single":
        base = ours[0]
    elif entry.split == "concat":
        base = torch.cat(ours, dim=-1)
    else:
        base = torch.stack(ours, dim=-1).flatten(-2)
    if entry.kind == "linear":
        return base.squeeze(0).mT.contiguous()
    if entry.kind == "stacked" and not entry.transposed:
        return base.mT.contiguous()
    return base.contiguous()


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.dtype == b.dtype
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def ours_to_hf(ours: list[Tensor], entry: Entry, hf_shape: torch.Size) -> tuple[Tensor, bool]:
    """The HF tensor for ``entry`` from our current tensors.

    Returns:
        ``(tensor, zero_copy)``: the storage our tensors already share when they are still views in
        HF's geometry, else a freshly assembled contiguous tensor.
    """
    ours = [t.detach() for t in ours]
    first = ours[0]
    offset = first.storage_offset()
    needed = (offset + torch.Size(hf_shape).numel()) * first.element_size()
    if first.device.type != "meta" and needed <= first.untyped_storage().nbytes():
        candidate = first.as_strided(hf_shape, _contiguous_strides(torch.Size(hf_shape)), offset)
        if all(_same_view(view, t) for view, t in zip(derive(candidate, entry), ours, strict=True)):
            return candidate, True
    hf = _assemble(ours, entry)
    if tuple(hf.shape) != tuple(hf_shape):
        raise ValueError(f"to_hf: {entry.hf_name} would be {tuple(hf.shape)}, the HF block wants {tuple(hf_shape)}")
    return hf, False
