"""MoE layers: pure functions (``functional``), routers, expert banks, dispatchers, count reductions and the ``MoE``
block.

Shape legend of the whole package. Tensor names end in the letters of their dims (``x_TD``, ``top_ids_TK``,
``counts_PL``); a letter means one thing in every file:

====  ===========================================  ====  ==============================================
B     batch (sequences in a micro-batch)           S     sequence length (positions)
T     tokens (flattened leading dims)              D     model width
E     experts of a layer (global ids)              K     top_k (experts per token)
N     token->expert assignments (T*K)              M     assignments kept after capacity (rows sent)
C     expert capacity (expert choice)              H     expert hidden width (2H: fused gate+up)
P     ranks of the expert-parallel group            L     local experts (E/P) held by a rank
R     rows a rank receives from its group          Y     MoE layers of a model
J     experts kept by pruning                      I, O  input and output width of one weight
V     vocabulary                                   F     dense feed-forward hidden width
Q, G  query heads, key/value heads                 A     attention head width
====  ===========================================  ====  ==============================================
"""

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
