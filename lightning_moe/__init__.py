"""lightning-moe: sparse Mixture-of-Experts for PyTorch Lightning.

Subclass :class:`MoELightningModule`, put :class:`MoE` layers in your model, and train with
``Trainer(strategy="moe")``.
"""

from lightning_moe.nn import ExpertChoiceRouter, GroupedExperts, MoE, TemplateExperts, TokenChoiceRouter

__version__ = "0.1.0"

__all__ = ["ExpertChoiceRouter", "GroupedExperts", "MoE", "TemplateExperts", "TokenChoiceRouter", "__version__"]
