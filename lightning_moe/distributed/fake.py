"""One rank of a large job in one process, on torch's fake process group (what torchtitan's dry runs use).

``init_process_group("fake", rank=4321, world_size=10000)`` gives a process group whose collectives complete at
once and move no data: device meshes, FSDP2's all-gathers and reduce-scatters, the all-to-all of expert
parallelism all run, allocating what a real rank allocates. Two things a real peer would send must be made up:

* the per-expert row counts of the expert-parallel exchange (they size the buffers): :class:`FakeBackendDispatcher`
  mirrors this rank's own counts, as if every peer routed like it, shifted by its position (peer ``s`` sends this
  rank what this rank sends rank ``2r - s``; an involution, so sent and received volumes agree). The rows
  themselves go through the real (fake) all-to-all; its bytes crossing to other ranks are counted;
* the answers of Lightning's object collectives (broadcast of a path or a seed, a reduced stop decision):
  :func:`mirror_reduce` answers as if every rank held this rank's value (MoEStrategy uses it on the fake backend).

And one thing a real backend does to memory must be done by hand: it writes every byte of an all-gather's output,
the fake one none, so untouched pages would never count in the RSS. :class:`WrittenAllGather` (FSDP2's
``set_custom_all_gather``) allocates FSDP's all-gather buffers zeroed, as written.

Shape legend (the package's): M rows this rank sends, R rows it receives, D model width, P EP group size (also
the source ranks), L local experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_moe import _compat
from lightning_moe.distributed.expert_parallel import ExpertParallelDispatcher, ExpertShard

__all__ = ["FakeBackendDispatcher", "WrittenAllGather", "init_fake_process_group", "is_fake_backend", "mirror",
           "mirror_reduce"]


def init_fake_process_group(rank: int, world_size: int) -> None:
    """Make this process global ``rank`` of ``world_size`` on torch's fake backend (no peers, no data moved)."""
    dist.init_process_group("fake", store=_compat.fake_store(), rank=rank, world_size=world_size)


def is_fake_backend() -> bool:
    """Whether the default process group is torch's fake one."""
    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "fake"


def mirror(rank: int, size: int) -> list[int]:
    """``m[s] = (2 * rank - s) % size``: the peer whose rows peer ``s`` sends ``rank`` in the mirrored world."""
    return [(2 * rank - s) % size for s in range(size)]


def mirror_reduce(tensor: Tensor, reduce_op: object, world_size: int) -> Tensor:
    """``all_reduce`` of ``tensor`` if every rank held it: ``world_size * tensor`` for a sum, ``tensor`` else."""
    op = str(reduce_op).lower()
    return tensor * world_size if op.endswith("sum") else tensor


class FakeBackendDispatcher(ExpertParallelDispatcher):
    """The expert-parallel dispatcher on the fake backend: mirrored counts, real (fake) row exchange, bytes counted.

    Args:
        shard: the experts this rank holds.
        group: the EP process group (of the fake backend).

    Attributes:
        bytes_sent: bytes of rows this rank sent to other ranks since :meth:`reset_counters`, forward (tokens,
            expert outputs) and backward (their gradients).
    """

    def __init__(self, shard: ExpertShard, group: dist.ProcessGroup | None) -> None:
        super().__init__(shard, group)
        self.mirror = mirror(shard.ep_rank, shard.ep_size)
        self.bytes_sent = 0

    def reset_counters(self) -> None:
        """Zero :attr:`bytes_sent`."""
        self.bytes_sent = 0

    def exchange_counts(self, send_counts_E: Tensor) -> Tensor:
        # NOTE: the fake all-to-all returns no counts: peer s sends what this rank sends peer mirror[s].
        P, L = self.shard.ep_size, self.shard.num_local
        return send_counts_E.view(P, L)[torch.tensor(self.mirror, device=send_counts_E.device)].reshape(-1)

    def exchange_rows(self, x_MD: Tensor, output_splits: Sequence[int], input_splits: Sequence[int]) -> Tensor:
        r = self.shard.ep_rank
        self.bytes_sent += (x_MD.shape[0] - input_splits[r]) * x_MD.shape[1] * x_MD.element_size()
        x_RD = super().exchange_rows(x_MD, output_splits, input_splits)
        if x_RD.requires_grad:  # its backward sends the gradients of the received rows back
            own = output_splits[r]
            x_RD.register_hook(lambda g: self._count((g.shape[0] - own) * g.shape[1] * g.element_size()))
        return x_RD

    def _count(self, sent: int) -> None:
        self.bytes_sent += sent


class WrittenAllGather:
    """FSDP2's all-gather (``FSDPModule.set_custom_all_gather``) with its output written, as a real backend does.

    ``allocate`` zero-fills the buffer (the memory a real all-gather touches); ``__call__`` runs the collective.
    """

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.zeros(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
