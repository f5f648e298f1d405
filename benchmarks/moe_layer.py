"""Forward+backward of one MoE layer against its GEMM floor, HF transformers and fairscale, as ratios in one run.

Work: top-2, 4096 tokens, dim 256, dropless; GELU experts (hidden 1024) and SwiGLU experts (hidden 512);
8 and 64 experts. Every implementation runs the same expert FLOPs (fairscale drops what overflows 2T/E).

- ``loop``: the floor. One ``mm`` per expert and weight on perfectly balanced, pre-sorted tokens, each
  expert's weights their own tensors (nothing to stack or gather): the expert GEMMs and activations alone,
  what any MoE layer must at least pay; no routing, no dispatch, no combine.
- ``bmm``: the same GEMMs as one ``torch.bmm`` over stacked weights ``[E, T*k/E, D]`` (the old floor).
- ``ours``: ``lightning_moe.MoE`` (fp32 router, sort-based dispatch, fused experts, combine, losses).
- ``hf <mode>``: HF transformers' experts (``MixtralExperts`` for SwiGLU, ``NemotronHExperts`` for GELU:
  non-gated) under each ``experts_implementation`` that fits in memory here, behind a softmax top-k router;
  ``batched_mm`` is left out: it gathers a ``[T*k, H, D]`` copy of the weights (8 GiB at this size).
- ``fairscale``: ``fairscale.nn.MOELayer`` + ``Top2Gate`` (one-hot einsum dispatch) with the package's
  ``DenseFFN`` experts, in a 1-process gloo group.

Timing (``benchmarks/_harness.py``): each implementation in its own worker process, one step each in turn,
round after round (order rotated), after warm-up; the table gives median wall-clock and CPU times of a step
and the medians over rounds of the per-round ratio to ``loop``. ``--malloc steady`` and ``--thp`` set
allocator environments for every worker alike (stacked ``[E, D, H]`` weights get 64 MiB gradients at 64
experts: above glibc's 32 MiB mmap threshold, every step faults them in afresh, 4 KiB at a time, unless
huge pages back them). Memory: each implementation in its own subprocess, the growth of peak RSS over one
steady-state step, with glibc told to return every block of 64 KiB or more to the OS on free
(``MALLOC_MMAP_THRESHOLD_``) so that RSS follows live tensors instead of the allocator's cache.

Usage: ``python benchmarks/moe_layer.py [--experts 8 64] [--activations gelu swiglu] [--threads 1] [--thp]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from _harness import interleaved, load_average, serve  # noqa: E402

from lightning_moe import MoE  # noqa: E402
from lightning_moe.memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from lightning_moe.models import DenseFFN  # noqa: E402

TOKENS, DIM, TOP_K = 4096, 256, 2
HIDDEN = {"gelu": 1024, "swiglu": 512}
HF_MODES = ("eager", "grouped_mm")
# Memory runs: blocks of 64 KiB and more are mapped and unmapped, so RSS follows the live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# --malloc steady: a fixed 32 MiB mmap threshold and no trimming, so freed blocks below 32 MiB are always
# reused (glibc's adaptive thresholds otherwise decide that from the allocation history).
STEADY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


class LoopFloor(nn.Module):
    """One ``mm`` per expert and weight on balanced pre-sorted rows; per-expert weight tensors."""

    def __init__(self, experts: int, activation: str) -> None:
        super().__init__()
        hidden = HIDDEN[activation]
        self.activation = activation

        def weights(rows: int, cols: int) -> nn.ParameterList:
            return nn.ParameterList(nn.Parameter(torch.randn(rows, cols) / rows**0.5) for _ in range(experts))

        self.w1, self.w2 = weights(DIM, hidden), weights(hidden, DIM)
        self.w3 = weights(DIM, hidden) if activation == "swiglu" else None

    def forward(self, x_MD: Tensor) -> list[Tensor]:
        outputs = []
        for e, x_CD in enumerate(x_MD.chunk(len(self.w1))):
            h_CH = x_CD @ self.w1[e]
            h_CH = F.silu(h_CH) * (x_CD @ self.w3[e]) if self.w3 is not None else F.gelu(h_CH)
            outputs.append(h_CH @ self.w2[e])
        return outputs  # no concatenation: the floor pays for nothing but the experts


class BmmFloor(nn.Module):
    """The same GEMMs as one ``bmm`` per weight over stacked weights and ``[E, C, D]`` rows."""

    def __init__(self, experts: int, activation: str) -> None:
        super().__init__()
        hidden = HIDDEN[activation]
        self.w1 = nn.Parameter(torch.randn(experts, DIM, hidden) / DIM**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, DIM) / hidden**0.5)
        self.w3 = nn.Parameter(torch.randn(experts, DIM, hidden) / DIM**0.5) if activation == "swiglu" else None

    def forward(self, x_ECD: Tensor) -> Tensor:
        h = torch.bmm(x_ECD, self.w1)
        h = F.silu(h) * torch.bmm(x_ECD, self.w3) if self.w3 is not None else F.gelu(h)
        return torch.bmm(h, self.w2)


class HFExperts(nn.Module):
    """HF transformers' experts behind a float32 softmax top-k router (weights renormalised, as ours)."""

    def __init__(self, experts: int, activation: str, mode: str) -> None:
        super().__init__()
        hidden = HIDDEN[activation]
        self.gate = nn.Linear(DIM, experts, bias=False)
        if activation == "swiglu":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts

            config = MixtralConfig(hidden_size=DIM, intermediate_size=hidden, num_local_experts=experts,
                                   num_experts_per_tok=TOP_K, experts_implementation=mode)
            self.experts = MixtralExperts(config)
        else:
            from transformers import NemotronHConfig
            from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

            config = NemotronHConfig(hidden_size=DIM, moe_intermediate_size=hidden, n_routed_experts=experts,
                                     num_experts_per_tok=TOP_K, mlp_hidden_act="gelu", experts_implementation=mode)
            self.experts = NemotronHExperts(config)
        for p in self.experts.parameters():
            nn.init.normal_(p, std=DIM**-0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        probs_TE = torch.softmax(self.gate(x_TD.float()), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, TOP_K, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return self.experts(x_TD, ids_TK, weights_TK.to(x_TD.dtype))


def available(names: list[str]) -> list[str]:
    """The implementations whose optional dependency is installed (HF transformers, fairscale)."""
    keep = []
    for name in names:
        module = "transformers" if name.startswith("hf") else "fairscale" if name == "fairscale" else None
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                print(f"# {name}: {module} is not installed, left out")
                continue
        keep.append(name)
    return keep


def build(name: str, experts: int, activation: str, dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    """``(module, input)`` of one implementation."""
    rows = TOKENS * TOP_K
    if name == "loop":
        return LoopFloor(experts, activation).to(dtype), torch.randn(rows, DIM, dtype=dtype)
    if name == "bmm":
        return BmmFloor(experts, activation).to(dtype), torch.randn(experts, rows // experts, DIM, dtype=dtype)
    if name == "ours":
        layer = MoE(DIM, experts, top_k=TOP_K, hidden_dim=HIDDEN[activation], activation=activation)
        return layer.to(dtype), torch.randn(TOKENS, DIM, dtype=dtype)
    if name.startswith("hf "):
        return HFExperts(experts, activation, name[3:]).to(dtype), torch.randn(TOKENS, DIM, dtype=dtype)
    if name == "fairscale":
        import torch.distributed as dist
        from fairscale.nn import MOELayer, Top2Gate

        if not dist.is_initialized():
            store = os.path.join(tempfile.mkdtemp(), "store")
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        ffns = nn.ModuleList(DenseFFN(DIM, HIDDEN[activation], activation) for _ in range(experts))
        x = torch.randn(TOKENS // 8, 8, DIM, dtype=dtype)  # [S, B, D]: fairscale wants 3-D input
        return MOELayer(Top2Gate(DIM, experts), ffns).to(dtype), x
    raise ValueError(f"unknown implementation {name!r}")


def step(module: nn.Module, x: Tensor) -> None:
    """One forward+backward of ``module`` on ``x`` (input gradient included), auxiliary losses added."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    outputs = out if isinstance(out, list) else [out]
    loss = sum(y.float().pow(2).sum() for y in outputs) / sum(y.numel() for y in outputs)
    for attr in ("aux_loss", "l_aux"):
        if isinstance(getattr(module, attr, None), Tensor):
            loss = loss + getattr(module, attr).float()
    loss.backward()
    module.zero_grad(set_to_none=True)


def measure_memory(name: str, experts: int, activation: str, dtype: str) -> int:
    """Peak RSS growth (bytes) of one steady-state forward+backward, in a fresh subprocess."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, str(experts), activation, dtype],
        check=True, capture_output=True, text=True,
        env={**{k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}, **MALLOC_ENV},
    )
    return int(out.stdout.strip().splitlines()[-1])


def _memory_child(name: str, experts: int, activation: str, dtype: str) -> None:
    torch.manual_seed(0)
    module, x = build(name, experts, activation, getattr(torch, dtype))
    step(module, x)
    step(module, x)
    before = rss_bytes()
    reset_peak_rss()
    step(module, x)
    print(peak_rss_bytes() - before)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--activations", nargs="+", default=["gelu", "swiglu"], choices=sorted(HIDDEN))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--impls", nargs="+", default=["loop", "bmm", "ours", *(f"hf {m}" for m in HF_MODES),
                                                       "fairscale"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument("--malloc", choices=["default", "steady"], default="default",
                        help="steady: glibc keeps freed blocks below 32 MiB for reuse (fixed thresholds)")
    parser.add_argument("--thp", action="store_true",
                        help="THP_MEM_ALLOC_ENABLE=1: torch backs allocations of 2 MiB and more with huge pages")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child or args.worker:
        name, experts, activation, dtype = args.memory_child or args.worker
        if args.memory_child:
            _memory_child(name, int(experts), activation, dtype)
        else:
            torch.manual_seed(0)
            module, x = build(name, int(experts), activation, getattr(torch, dtype))
            serve(lambda: step(module, x))
        return {}

    names = available(args.impls)
    if "loop" not in names:
        names.insert(0, "loop")
    env = {**(STEADY_ENV if args.malloc == "steady" else {}), **({"THP_MEM_ALLOC_ENABLE": "1"} if args.thp else {})}
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.dtype}, {TOKENS} tokens, dim {DIM}, top-{TOP_K}, "
          f"dropless; malloc {args.malloc}, THP {'on' if args.thp else 'off'}; load average {load_average():.1f}; "
          f"{args.repeats} interleaved rounds, one worker process per implementation")
    header = (f"| {'act':>6} | {'E':>3} | {'impl':>14} | {'wall ms':>8} | {'x loop':>6} | {'CPU ms':>8} "
              f"| {'x loop':>6} | {'peak MiB':>8} | {'x loop':>6} |")
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    results: dict = {}
    for activation in args.activations:
        for experts in args.experts:
            workers = {n: [os.path.abspath(__file__), "--worker", n, str(experts), activation, args.dtype,
                           "--threads", str(threads)] for n in names}
            times = interleaved(workers, args.repeats, reference="loop", env=env)
            mem = {} if args.no_memory else {n: measure_memory(n, experts, activation, args.dtype) for n in names}
            for name in names:
                t = times[name]
                peak = f"{mem[name] / 2**20:>8.1f} | {mem[name] / max(mem['loop'], 1):>6.2f}" if mem else \
                    f"{'-':>8} | {'-':>6}"
                print(f"| {activation:>6} | {experts:>3} | {name:>14} | {1e3 * t['wall']:>8.1f} | {t['wall_x']:>6.2f} "
                      f"| {1e3 * t['cpu']:>8.1f} | {t['cpu_x']:>6.2f} | {peak} |", flush=True)
            results[f"{activation}/{experts}"] = {"times": times, "peak_bytes": mem}
    print(f"load average at the end {load_average():.1f}")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
