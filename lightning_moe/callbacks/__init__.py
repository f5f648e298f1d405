"""Lightning callbacks for MoE training."""

from lightning_moe.callbacks.compression import ExpertQuantization, LowRankExperts
from lightning_moe.callbacks.monitor import ExpertLoadMonitor
from lightning_moe.callbacks.precision import NonFiniteGuard, RouterPrecision
from lightning_moe.callbacks.pruning import ExpertMagnitudePruning, ExpertPruning

__all__ = ["ExpertLoadMonitor", "ExpertMagnitudePruning", "ExpertPruning", "ExpertQuantization", "LowRankExperts",
           "NonFiniteGuard", "RouterPrecision"]
