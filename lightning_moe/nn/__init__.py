"""MoE layers: pure functions (``functional``), routers, expert banks, dispatchers, count reductions and the ``MoE``
block."""

from lightning_moe.nn import functional
from lightning_moe.nn.dispatch import DispatchPlan, ExpertDispatcher, LocalDispatcher
from lightning_moe.nn.experts import GroupedExperts, TemplateExperts
from lightning_moe.nn.moe import MoE, find_moe_layers
from lightning_moe.nn.reduce import CountReduction, LocalCountReduction
from lightning_moe.nn.router import ExpertChoiceRouter, TokenChoiceRouter

__all__ = [
    "CountReduction",
    "DispatchPlan",
    "ExpertChoiceRouter",
    "ExpertDispatcher",
    "GroupedExperts",
    "LocalCountReduction",
    "LocalDispatcher",
    "MoE",
    "TemplateExperts",
    "TokenChoiceRouter",
    "find_moe_layers",
    "functional",
]
