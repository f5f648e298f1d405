"""One-GPU check, under 5 minutes: the MoE layer in bf16 against its GEMM floor and HF, the LM example, GPU tests.

1. ``layer``: :class:`lightning_moe.MoE` in bf16 (SwiGLU experts, top-2, dropless; on CUDA the experts run as
   one grouped GEMM, ``torch._grouped_mm``), fwd+bwd, against ``floor``: the same expert FLOPs as plain bf16
   GEMMs on balanced, pre-sorted rows (one ``[T*k, D] x [D, H]`` GEMM per weight, as if all rows went to
   one expert; no routing). Target: layer at most 1.2x the floor.
2. ``hf grouped_mm``: HF transformers' ``MixtralSparseMoeBlock`` with ``experts_implementation="grouped_mm"``,
   same sizes, bf16.
3. ``examples/language_model.py`` on the GPU under ``bf16-mixed`` (1 device, through the Trainer): tokens/s.
4. ``pytest -m gpu``.

Times are medians of CUDA-event-timed steps after warm-up. Without CUDA the script says so and exits with
status 2 (nothing measured); ``--cpu-smoke`` runs every part at toy sizes on the CPU instead (it checks the
script, not the hardware).

Usage: ``python benchmarks/gpu_check.py [--json results.json] [--skip-tests]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]  # run from a checkout

from lightning_moe import MoE  # noqa: E402

GPU_SIZES = dict(tokens=16384, dim=1024, hidden=2816, experts=8, top_k=2)
SMOKE_SIZES = dict(tokens=256, dim=64, hidden=128, experts=4, top_k=2)


def _time(step, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``step()`` (CUDA events on a GPU, the wall clock on the CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Floor(nn.Module):
    """The expert GEMMs of the layer as one GEMM per weight over all ``T*k`` rows (SwiGLU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HFMixtral(nn.Module):
    """HF transformers' Mixtral sparse MoE block (router + grouped_mm experts); input ``[T, D]``."""

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=experts,
                               num_experts_per_tok=top_k, experts_implementation="grouped_mm")
        self.block = MixtralSparseMoeBlock(config)
        for p in self.block.parameters():
            nn.init.normal_(p, std=dim**-0.5)

    def forward(self, x):
        return self.block(x[None])[0]


def layer_checks(device: torch.device, sizes: dict, repeats: int) -> dict:
    """Parts 1 and 2: median fwd+bwd seconds of the layer, the floor and HF's block, and the ratios."""
    T, D, H, E, K = (sizes[k] for k in ("tokens", "dim", "hidden", "experts", "top_k"))
    torch.manual_seed(0)
    models = {"layer": (MoE(D, E, top_k=K, hidden_dim=H, activation="swiglu"), torch.randn(T, D)),
              "floor": (Floor(D, H), torch.randn(T * K, D))}
    try:
        models["hf grouped_mm"] = (HFMixtral(D, H, E, K), torch.randn(T, D))
    except ImportError as err:
        print(f"# hf grouped_mm: left out ({err})")
    out = {}
    for name, (model, x) in models.items():
        model = model.to(device, torch.bfloat16)
        x = x.to(device, torch.bfloat16)

        def step(model=model, x=x):
            y = model(x.requires_grad_(True))
            loss = y.float().square().mean() + (model.aux_loss.float() if isinstance(model, MoE) else 0.0)
            loss.backward()
            model.zero_grad(set_to_none=True)

        out[name] = _time(step, device, repeats)
    out["layer / floor"] = out["layer"] / out["floor"]
    if "hf grouped_mm" in out:
        out["layer / hf grouped_mm"] = out["layer"] / out["hf grouped_mm"]
    return out


def lm_example(device: torch.device, smoke: bool, steps: int) -> dict:
    """Part 3: ``examples/language_model.py`` through the Trainer under bf16-mixed on one device: tokens/s."""
    import language_model

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--accelerator", "gpu" if device.type == "cuda" else "cpu", "--devices", "1", "--precision",
                "bf16-mixed", "--max-steps", str(steps), "--val-every", str(10 * steps), "--logger", "csv",
                "--log-dir", tmp, *(["--smoke"] if smoke else [])]
        with contextlib.redirect_stdout(io.StringIO()):
            result = language_model.main(argv)
        args = language_model.parse_args(argv)
    tokens = result["steps"] * args.batch_size * args.seq_len
    return {"steps": result["steps"], "train_seconds": result["train_seconds"],
            "tokens_per_second": tokens / result["train_seconds"], "held_out_loss": result["held_out_loss"]}


def gpu_tests() -> dict:
    """Part 4: ``pytest -m gpu`` in the repository; its exit code and summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (checks the script only)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--skip-tests", action="store_true", help="leave out pytest -m gpu")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured. Run it on a machine with one GPU "
              "(or pass --cpu-smoke to check the script at toy sizes on the CPU).", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    started = time.perf_counter()
    name = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    sizes = SMOKE_SIZES if args.cpu_smoke else GPU_SIZES
    print(f"gpu_check on {name}, torch {torch.__version__}; layer sizes {sizes}")
    results: dict = {"device": name, "sizes": sizes}
    results["layer"] = layer_checks(device, sizes, 2 if args.cpu_smoke else args.repeats)
    for key, value in results["layer"].items():
        unit = "" if "/" in key else " ms"
        print(f"  {key:>22}: {value if '/' in key else 1e3 * value:8.3f}{unit}")
    verdict = "met" if results["layer"]["layer / floor"] <= 1.2 else "NOT met"
    print(f"  target layer <= 1.2x floor: {verdict}")
    results["lm_example"] = lm_example(device, args.cpu_smoke, 3 if args.cpu_smoke else args.lm_steps)
    lm = results["lm_example"]
    print(f"  LM example bf16-mixed: {lm['tokens_per_second']:,.0f} tokens/s ({lm['steps']} steps, "
          f"held-out loss {lm['held_out_loss']:.3f})")
    if not (args.skip_tests or args.cpu_smoke):
        results["pytest_gpu"] = gpu_tests()
        print(f"  pytest -m gpu: {results['pytest_gpu']['summary']}")
    results["seconds"] = time.perf_counter() - started
    print(f"done in {results['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=lambda v: v if math.isfinite(v) else str(v))
    return results


if __name__ == "__main__":
    main()
