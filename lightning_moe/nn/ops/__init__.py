"""Fused pieces of the MoE hot path, each next to the reference it is tested against (``tests/test_perf_paths.py``).

- :mod:`~lightning_moe.nn.ops.grouped_mlp`: the experts on rows grouped by expert (``grouped_mlp``), and the
  whole local data path, gather + experts + weighted combine, expert by expert (``routed_mlp``);
- :mod:`~lightning_moe.nn.ops.combine`: the weighted sum of expert outputs back per token (``weighted_combine``);
- :mod:`~lightning_moe.nn.ops.expert_kernels`: the per-expert loops both fused paths run;
- :mod:`~lightning_moe.nn.ops.compiled`: ``routed_mlp`` as custom operators for ``torch.compile``.
"""

from lightning_moe.nn.ops.combine import weighted_combine, weighted_combine_reference
from lightning_moe.nn.ops.grouped_mlp import (
    FUSED_ACTIVATIONS,
    grouped_mlp,
    grouped_mlp_reference,
    routed_mlp,
    routed_mlp_reference,
)

__all__ = [
    "FUSED_ACTIVATIONS",
    "grouped_mlp",
    "grouped_mlp_reference",
    "routed_mlp",
    "routed_mlp_reference",
    "weighted_combine",
    "weighted_combine_reference",
]
