"""Compress trained experts for inference: int8 weight-only quantization and low-rank (SVD) factors.

Experts hold almost all of an MoE model's parameters, so both methods touch expert banks only
(routers and dense layers stay as they are). Each swaps ``layer.experts`` (a
:class:`~lightning_moe.nn.GroupedExperts`) for a bank with the same interface
``(x_MD, counts) -> y_MD`` and the same ``num_experts`` / ``expert_offset``, so the layer, its
dispatcher and an expert-parallel shard run unchanged, and returns a :class:`CompressionReport`
of parameters and bytes before and after.

Modules: ``report.py`` (reports, expert banks), ``quantize.py`` (int8), ``low_rank.py`` (SVD factors).
"""


from lightning_moe.compress.low_rank import (
    LowRankGroupedExperts,
    energy_rank,
    energy_ranks,
    low_rank_experts,
    low_rank_factors,
)
from lightning_moe.compress.quantize import KERNELS, QuantizedGroupedExperts, quantize_experts, quantize_per_channel
from lightning_moe.compress.report import (
    SUPPORTED_ACTIVATIONS,
    WEIGHTS,
    CompressionReport,
    LayerCompression,
    module_bytes,
)

__all__ = ["KERNELS", "SUPPORTED_ACTIVATIONS", "WEIGHTS", "CompressionReport", "LayerCompression",
           "LowRankGroupedExperts", "QuantizedGroupedExperts", "energy_rank", "energy_ranks", "low_rank_experts",
           "low_rank_factors", "module_bytes", "quantize_experts", "quantize_per_channel"]
