"""Expert parallelism: autograd-aware all-to-all, expert sharding and the EP token dispatcher."""

from lightning_moe.distributed.all_to_all import all_to_all, all_to_all_counts
from lightning_moe.distributed.expert_parallel import (
    ExpertParallelDispatcher,
    ExpertShard,
    find_moe_layers,
    shard_moe_layer,
    unshard_moe_layer,
)

__all__ = [
    "ExpertParallelDispatcher",
    "ExpertShard",
    "all_to_all",
    "all_to_all_counts",
    "find_moe_layers",
    "shard_moe_layer",
    "unshard_moe_layer",
]
