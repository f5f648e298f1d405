"""Expert parallelism: autograd-aware all-to-all, expert sharding and the EP token dispatcher; the count
reduction of the global balancing loss."""

from lightning_moe.distributed.all_to_all import all_to_all, all_to_all_counts
from lightning_moe.distributed.count_reduction import (
    ProcessGroupCountReduction,
    install_count_reduction,
    remove_count_reduction,
)
from lightning_moe.distributed.expert_parallel import (
    ExpertParallelDispatcher,
    ExpertShard,
    ShardedDispatcher,
    expert_group,
    expert_shard,
    shard_moe_layer,
    unshard_moe_layer,
)
from lightning_moe.nn.moe import find_moe_layers  # re-exported: defined once, in lightning_moe.nn

__all__ = [
    "ExpertParallelDispatcher",
    "ExpertShard",
    "ProcessGroupCountReduction",
    "ShardedDispatcher",
    "all_to_all",
    "all_to_all_counts",
    "expert_group",
    "expert_shard",
    "find_moe_layers",
    "install_count_reduction",
    "remove_count_reduction",
    "shard_moe_layer",
    "unshard_moe_layer",
]
