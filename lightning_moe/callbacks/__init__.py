"""Lightning callbacks for MoE training."""

from lightning_moe.callbacks.monitor import ExpertLoadMonitor

__all__ = ["ExpertLoadMonitor"]
