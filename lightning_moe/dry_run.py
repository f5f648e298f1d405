"""Dry run of a planned job: one rank of it built for real, in this process, and its training step run.

The capacity planner (:mod:`lightning_moe.plan`) predicts a rank's parameters, memory and traffic; this module
checks those predictions against a real model made of :class:`~lightning_moe.MoE` layers:

1. :func:`~lightning_moe.models.build_model` turns an :class:`~lightning_moe.plan.Architecture` into the
   decoder-only :class:`~lightning_moe.models.Transformer` whose parameter count equals
   :func:`~lightning_moe.plan.count_params` exactly; on the meta device it costs no memory at any size (a
   trillion parameters included).
2. :func:`shard_for_rank` keeps only the experts of global rank ``r`` of a :class:`~lightning_moe.plan.Layout`
   (the strategy's :func:`~lightning_moe.distributed.shard_moe_layer`, still on meta) and installs a
   :class:`~lightning_moe.distributed.simulated.SimulatedExpertParallel` dispatcher in every MoE layer.
3. :func:`materialise_rank` allocates that share and initialises it deterministically: expert ``g`` of a
   layer from ``(seed, layer, g)``, every dense tensor from ``(seed, its name)``, so each rank could build
   its share alone and all shares agree with the single-process model.
4. :func:`simulate_step` runs forward, backward and an Adam step of that rank, measuring peak memory (growth
   of peak RSS) and step time against the planner's prediction for the same layout.

Not to be confused with :mod:`lightning_moe.distributed.simulated` (the expert-parallel dispatcher whose peers
are simulated, used here) or :mod:`lightning_moe.plan` (the formulas, no tensors).

Shape legend: B micro-batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.distributed.expert_parallel import ExpertShard, shard_moe_layer
from lightning_moe.distributed.materialise import materialise, seed_for
from lightning_moe.distributed.simulated import SimulatedExpertParallel
from lightning_moe.memory import mmap_large_allocations, peak_rss_bytes, reset_peak_rss, rss_bytes
from lightning_moe.models.transformer import Transformer, build_model, num_params
from lightning_moe.nn.moe import find_moe_layers
from lightning_moe.plan import Architecture, Layout, check_layout, params_per_rank, plan

_SIMULATED = {"dense_sharding": "replicated", "expert_sharding": "replicated", "weight_dtype": "fp32",
              "grad_dtype": "fp32", "optim_dtype": "fp32", "act_dtype": "fp32", "activation_checkpointing": False,
              "flash_attention": True}  # fmt: skip


def rank_coordinates(rank: int, layout: Layout, arch: Architecture | None = None) -> tuple[int, int]:
    """``(ep_rank, dp_rank)`` of global ``rank``: ranks ``[j*ep, (j+1)*ep)`` form EP group ``j``.

    Args:
        rank: Global rank in ``[0, layout.gpus)``.
        layout: The layout.
        arch: When given, the layout is checked against it (``ep`` divides experts and gpus).

    Returns:
        The rank's index in its expert-parallel group and in its expert-data-parallel group.

    Raises:
        ValueError: On a rank outside the layout or a layout that cannot host ``arch``.
    """
    if arch is not None:
        check_layout(arch, layout)
    elif layout.gpus % layout.ep:
        raise ValueError(f"rank_coordinates: ep={layout.ep} must divide gpus={layout.gpus}; pick another ep")
    if not 0 <= rank < layout.gpus:
        raise ValueError(f"rank_coordinates: rank={rank} must be in [0, gpus={layout.gpus}); pick a rank of the layout")
    return rank % layout.ep, rank // layout.ep


def shard_for_rank(model: Transformer, rank: int, layout: Layout) -> list[ExpertShard]:
    """Keep global ``rank``'s experts in every MoE layer and install :class:`SimulatedExpertParallel`.

    Works on meta tensors (nothing is allocated). Dense parameters stay whole (``dense_sharding`` is not
    applied: each rank materialises them, see :attr:`~lightning_moe.plan.RankParams.materialised`).

    Args:
        model: From :func:`build_model`, not yet sharded.
        rank: Global rank in ``[0, layout.gpus)``.
        layout: Supplies ``gpus`` and ``ep``.

    Returns:
        The shard of every MoE layer.

    Raises:
        ValueError: On a bad rank or layout, or an already sharded model.

    Example:
        >>> from lightning_moe.plan import PRESETS
        >>> model = build_model(PRESETS["mixtral-8x7b"])  # on meta: 46.7 B parameters, no memory
        >>> shards = shard_for_rank(model, rank=11, layout=Layout(gpus=16, gpu_memory=80 * 2**30, ep=8))
        >>> len(shards), shards[0].offset, shards[0].num_local  # expert 3 of each of the 32 MoE layers
        (32, 3, 1)
    """
    ep_rank, _ = rank_coordinates(rank, layout, model.arch)
    if any(layer.expert_dispatcher is not None for _, layer in find_moe_layers(model)):
        raise ValueError("shard_for_rank: the model is already sharded; build a new one with build_model")
    shards = []
    for path, layer in find_moe_layers(model):
        shard = shard_moe_layer(layer, path, ep_rank=ep_rank, ep_size=layout.ep, group=None)
        layer.expert_dispatcher = SimulatedExpertParallel(shard)
        shards.append(shard)
    return shards


@torch.no_grad()
def materialise_rank(model: nn.Module, seed: int = 0, device: torch.device | str = "cpu") -> int:
    """Allocate ``model`` (built on meta, sharded or not) on ``device`` and initialise it deterministically.

    The strategy's :func:`~lightning_moe.distributed.materialise.materialise`: expert ``g`` of the expert bank at
    path ``p`` draws from ``(seed, p, g)`` (global id), every other module from ``(seed, its path)``; buffers
    (routing stats, expert biases) start at zero as in a freshly built model. A rank's share therefore equals the
    matching slice of the whole model materialised in one process.

    Args:
        model: The model on the meta device.
        seed: Base seed, the same on every rank.
        device: Target device.

    Returns:
        Number of parameters materialised.
    """
    return materialise(model, seed, device)


@dataclass(frozen=True)
class SimulationReport:
    """Result of :func:`simulate_step` (bytes, seconds; ``predicted_*`` from :func:`~lightning_moe.plan.plan`).

    Attributes:
        rank, ep_rank, dp_rank: Global rank and its coordinates.
        local_experts: Global ids ``(first, last)`` of the rank's experts in every MoE layer.
        materialised_params: Parameters allocated (== ``predicted_params``, checked).
        predicted_params: ``params_per_rank(arch, layout).materialised``.
        param_bytes: RSS growth of materialisation.
        state_bytes: RSS growth after the first step (weights, gradients, Adam states).
        predicted_state_bytes: Planner weights + grads + optimizer states.
        peak_bytes: Peak RSS growth over materialisation and all steps.
        predicted_bytes: Planner ``total_bytes`` (states + activations).
        saved_activation_bytes: Bytes of the distinct tensors autograd saved for backward in the first step
            (``saved_tensors_hooks``; parameters excluded), the measured counterpart of the planner's activations.
        predicted_activation_bytes: Planner activations.
        ratio: ``peak_bytes / predicted_bytes``.
        step_seconds: Median time of forward + backward + optimizer step after the first.
        bytes_sent, bytes_received: All-to-all bytes of the last step, summed over MoE layers.
        predicted_all_to_all_bytes: Planner ``all_to_all_bytes`` (bytes sent per step).
        expert_rows: Rows the rank's experts processed per step, all MoE layers.
        loss: Last training loss.
    """

    rank: int
    ep_rank: int
    dp_rank: int
    local_experts: tuple[int, int]
    materialised_params: int
    predicted_params: int
    param_bytes: int
    state_bytes: int
    predicted_state_bytes: int
    peak_bytes: int
    predicted_bytes: int
    saved_activation_bytes: int
    predicted_activation_bytes: int
    ratio: float
    step_seconds: float
    bytes_sent: int
    bytes_received: int
    predicted_all_to_all_bytes: int
    expert_rows: int
    loss: float

    def table(self) -> str:
        """Measured against predicted, one row per figure."""
        gib = 1024**3
        rows = [
            ("rank", f"{self.rank} (ep_rank {self.ep_rank}, dp_rank {self.dp_rank}), "
                     f"experts {self.local_experts[0]}..{self.local_experts[1]} of every MoE layer"),
            ("params materialised", f"{self.materialised_params:,} (planner {self.predicted_params:,})"),
            ("weights+grads+Adam", f"{self.state_bytes / gib:.3f} GiB "
                                   f"(planner {self.predicted_state_bytes / gib:.3f})"),
            ("peak memory", f"{self.peak_bytes / gib:.3f} GiB (planner {self.predicted_bytes / gib:.3f}, "
                            f"activations {self.predicted_activation_bytes / gib:.3f})"),
            ("measured / predicted", f"{self.ratio:.3f}"),
            ("saved for backward", f"{self.saved_activation_bytes / gib:.3f} GiB "
                                   f"(planner activations {self.predicted_activation_bytes / gib:.3f})"),
            ("step time", f"{self.step_seconds:.2f} s (forward + backward + Adam)"),
            ("all-to-all sent", f"{self.bytes_sent:,} B/step (planner {self.predicted_all_to_all_bytes:,}, ratio "
                                f"{self.bytes_sent / max(self.predicted_all_to_all_bytes, 1):.4f}); "
                                f"received {self.bytes_received:,}"),
            ("expert rows", f"{self.expert_rows:,} per step over all MoE layers"),
        ]  # fmt: skip
        return "\n".join(f"{k:<22} {v}" for k, v in rows)


def simulation_layout(layout: Layout, **overrides) -> Layout:
    """``layout`` with the precisions and options :func:`simulate_step` runs (fp32, replicated, flash, no recompute).

    Args:
        layout: A layout, e.g. the production one.
        **overrides: Other :class:`~lightning_moe.plan.Layout` fields to change (``seq_len=256``).

    Returns:
        The layout as simulated.
    """
    return dataclasses.replace(layout, **{**_SIMULATED, "master_weights": False, **overrides})


def simulate_step(arch: Architecture, layout: Layout, rank: int = 0, steps: int = 2, seed: int = 0,
                  lr: float = 1e-4, exact_rss: bool = False) -> SimulationReport:
    """Run ``steps`` training steps of global ``rank`` of ``layout`` in this process, peers simulated.

    Builds the model on meta, shards it for ``rank``, materialises the share on CPU, then runs forward,
    backward and ``torch.optim.Adam`` (fused) on ``layout.micro_batch x layout.seq_len`` random tokens.
    Memory is the growth of this process's peak RSS (Linux ``VmHWM``) from just before materialisation.

    Args:
        arch: The model (see :func:`build_model`).
        layout: As simulated: fp32 weights, grads, Adam states and activations, replicated dense and expert
            weights, no recomputation, flash attention (see :func:`simulation_layout`).
        rank: Global rank to play.
        steps: Training steps (>= 2; the first allocates gradients and Adam states and is not timed).
        seed: Initialisation and data seed.
        lr: Adam learning rate.
        exact_rss: First make glibc serve every allocation of 64 KiB or more with its own mapping, for the rest
            of the process (``mallopt(M_MMAP_THRESHOLD)``), so freed tensors leave RSS at once and RSS follows
            live memory. Without it, freed activations stay in the heap and RSS over-reads (~8% here). Use it in
            a process of its own (the example does): it makes large allocations a little slower.

    Returns:
        The measurements next to the planner's predictions.

    Raises:
        ValueError: On a layout that differs from what is simulated, a bad rank, or ``steps < 2``.
    """
    wrong = {f: getattr(layout, f) for f, v in _SIMULATED.items() if getattr(layout, f) != v}
    if wrong:
        raise ValueError(f"simulate_step: layout fields {wrong} differ from the simulation's {_SIMULATED}; "
                         "pass simulation_layout(layout)")
    if steps < 2:
        raise ValueError(f"simulate_step: steps={steps} must be >= 2 (the first step is not timed); raise it")
    ep_rank, dp_rank = rank_coordinates(rank, layout, arch)
    predicted, per_rank = plan(arch, layout), params_per_rank(arch, layout)
    model = build_model(arch, device="meta")
    shards = shard_for_rank(model, rank, layout)
    if num_params(model) != per_rank.materialised:
        raise AssertionError(f"simulate_step: rank holds {num_params(model):,} parameters on meta, planner says "
                             f"{per_rank.materialised:,}")
    gen = torch.Generator().manual_seed(seed_for(seed, f"data/{rank}"))
    tokens = torch.randint(arch.vocab, (layout.micro_batch, layout.seq_len + 1), generator=gen)
    dispatchers = [layer.expert_dispatcher for _, layer in find_moe_layers(model)
                   if isinstance(layer.expert_dispatcher, SimulatedExpertParallel)]

    if exact_rss:
        mmap_large_allocations()
    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    materialised = materialise_rank(model, seed)
    param_bytes = rss_bytes() - base
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    times: list[float] = []
    state_bytes, saved_bytes, loss = 0, 0, torch.zeros(())
    for step in range(steps):
        for d in dispatchers:
            d.reset_counters()
        start = time.perf_counter()
        with _count_saved_tensors(model, record=step == 0) as saved:
            logits_BSV = model(tokens[:, :-1])
            loss = F.cross_entropy(logits_BSV.flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss()
        del logits_BSV
        if step == 0:
            saved_bytes = sum(saved.values())
        loss.backward()
        loss = loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in the planner (and DDP buckets)
        times.append(time.perf_counter() - start)
        if step == 0:
            state_bytes = rss_bytes() - base
    peak = peak_rss_bytes() - base
    return SimulationReport(
        rank, ep_rank, dp_rank, (shards[0].offset, shards[0].offset + shards[0].num_local - 1) if shards else (0, -1),
        materialised, per_rank.materialised, param_bytes, state_bytes,
        predicted.param_bytes + predicted.grad_bytes + predicted.optimizer_bytes, peak, predicted.total_bytes,
        saved_bytes, predicted.activation_bytes, peak / predicted.total_bytes, statistics.median(times[1:]),
        sum(d.bytes_sent for d in dispatchers), sum(d.bytes_received for d in dispatchers),
        predicted.all_to_all_bytes, sum(d.rows_processed for d in dispatchers), loss.item(),
    )  # fmt: skip


@contextlib.contextmanager
def _count_saved_tensors(model: nn.Module, record: bool):
    """Collect ``{storage: bytes}`` of the tensors autograd saves for backward (parameters excluded)."""
    saved: dict[int, int] = {}
    if not record:
        yield saved
        return
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
