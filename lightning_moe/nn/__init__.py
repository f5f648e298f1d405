"""MoE layers: pure functions (``functional``), routers, expert banks and the ``MoE`` block."""

from lightning_moe.nn import functional
from lightning_moe.nn.experts import GroupedExperts, TemplateExperts
from lightning_moe.nn.moe import MoE
from lightning_moe.nn.router import ExpertChoiceRouter, TokenChoiceRouter

__all__ = ["ExpertChoiceRouter", "GroupedExperts", "MoE", "TemplateExperts", "TokenChoiceRouter", "functional"]
