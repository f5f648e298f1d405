"""One training step of small transformers MoE models: HF's experts implementations vs the same model after from_hf.

Models: Qwen3-MoE and Mixtral with the same shapes (2 layers, width 128, SwiGLU experts of width 256,
top-2, 4 heads, vocabulary 512), 8 and 64 experts, fp32, random init. Input: 4 x 128 tokens (HF's
``batched_mm`` gathers one weight copy per assignment: 400 MB a layer here, and grows with tokens).

- ``eager``, ``batched_mm``, ``grouped_mm``: transformers' experts implementations
  (``model.set_experts_implementation``): a Python loop over the experts hit, one gathered weight
  per assignment (``bmm``), and one grouped GEMM over expert-sorted tokens.
- ``converted``: the same model after :func:`lightning_moe.from_hf` (its routing losses are computed
  in the forward, as in training, though not added: HF adds none without ``output_router_logits``).

One step = forward, cross-entropy on the logits, backward, ``zero_grad``. Implementations are
interleaved (each repeat runs every one once) and the median is reported; before timing, each HF
mode's logits are checked against the converted model's. The CPU may be shared: read the ratios.

Usage: ``python benchmarks/hf_moe.py [--experts 8 64] [--repeats 5] [--families qwen3_moe mixtral]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import lightning_moe as lmoe

HF_MODES = ("eager", "batched_mm", "grouped_mm")
BATCH, SEQ, VOCAB, WIDTH, HIDDEN = 4, 128, 512, 128, 256


def config(family: str, experts: int):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=WIDTH // 4, moe_intermediate_size=HIDDEN,
                                           intermediate_size=2 * HIDDEN, num_experts=experts, num_experts_per_tok=2,
                                           norm_topk_prob=True)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=HIDDEN, num_local_experts=experts,
                                          num_experts_per_tok=2)
    raise ValueError(f"unknown family {family!r}")


def build(family: str, experts: int) -> dict[str, torch.nn.Module]:
    """The four variants of one model, same weights."""
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config(family, experts)).train()
    variants = {}
    for mode in HF_MODES:
        model = copy.deepcopy(base)
        model.set_experts_implementation(mode)
        variants[mode] = model
    converted = copy.deepcopy(base)
    lmoe.from_hf(converted)
    variants["converted"] = converted
    return variants


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)


def check(variants: dict[str, torch.nn.Module], ids: torch.Tensor) -> float:
    with torch.no_grad():
        ours = variants["converted"].eval()(input_ids=ids).logits
        diff = max(float((variants[m].eval()(input_ids=ids).logits - ours).abs().max()) for m in HF_MODES)
    for model in variants.values():
        model.train()
    return diff


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--families", nargs="+", default=["qwen3_moe", "mixtral"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import transformers

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"fp32, {BATCH}x{SEQ} tokens, 2 layers, width {WIDTH}, SwiGLU experts {HIDDEN}, top-2; "
          f"median of {args.repeats}")
    header = (f"| {'model':<9} | {'experts':>7} | {'eager ms':>8} | {'batched_mm ms':>13} | {'grouped_mm ms':>13} | "
              f"{'converted ms':>12} | {'best HF / converted':>19} |")
    print(header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    results = {}
    for family in args.families:
        for experts in args.experts:
            variants = build(family, experts)
            diff = check(variants, ids)
            if diff > 1e-4:
                raise RuntimeError(f"{family} {experts} experts: converted logits differ from HF's by {diff:.3g}")
            for model in variants.values():  # warm-up: allocator, first-call paths
                step(model, ids)
            times = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, model in variants.items():
                    start = time.perf_counter()
                    step(model, ids)
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            best = min(HF_MODES, key=ms.get)
            ratio = ms[best] / ms["converted"]
            print(f"| {family:<9} | {experts:>7} | {ms['eager']:>8.1f} | {ms['batched_mm']:>13.1f} | "
                  f"{ms['grouped_mm']:>13.1f} | {ms['converted']:>12.1f} | {ratio:>12.2f} ({best}) |")
            results[f"{family}/{experts}"] = {"ms": ms, "best_hf": best, "speedup": ratio, "max_logit_diff": diff}
            del variants
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
