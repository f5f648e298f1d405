"""lightning-moe: sparse Mixture-of-Experts for PyTorch Lightning.

Subclass :class:`MoELightningModule`, put :class:`MoE` layers in your model, and train with
``Trainer(strategy="moe")``.
"""

from lightning_moe import callbacks, compress, metrics
from lightning_moe.hf import HFConversionReport, from_hf, to_hf  # transformers itself is imported when called
from lightning_moe.module import MoELightningModule
from lightning_moe.nn import ExpertChoiceRouter, GroupedExperts, MoE, TemplateExperts, TokenChoiceRouter
from lightning_moe.strategy import MoEStrategy  # importing registers Trainer(strategy="moe")
from lightning_moe.upcycle import UpcycleReport, upcycle

__version__ = "0.1.0"

__all__ = ["ExpertChoiceRouter", "GroupedExperts", "HFConversionReport", "MoE", "MoELightningModule", "MoEStrategy",
           "TemplateExperts", "TokenChoiceRouter", "UpcycleReport", "__version__", "callbacks", "compress", "from_hf",
           "metrics", "to_hf", "upcycle"]
