"""The capacity planner's command line: ``python -m lightning_moe.plan --preset mixtral-8x7b --gpus 8 --ep 8``.

Every :class:`~lightning_moe.plan.Architecture` and :class:`~lightning_moe.plan.Layout` field is a flag; a
``--preset`` fills the architecture, flags override it; ``--json`` prints the plan as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lightning_moe.plan import (
    ACTIVATIONS,
    DTYPE_BYTES,
    GIB,
    PRESETS,
    SHARDINGS,
    Architecture,
    Layout,
    count_params,
    min_ep_that_fits,
    plan,
    valid_eps,
)

_ARCH_FIELDS = [f.name for f in dataclasses.fields(Architecture) if f.name != "name"]
_LAYOUT_FIELDS = [f.name for f in dataclasses.fields(Layout)]
_REQUIRED = ("layers", "dim", "heads", "vocab", "expert_hidden", "experts", "top_k")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_moe.plan", description="Capacity planner for MoE models.")
    p.add_argument("--preset", choices=list(PRESETS), help="start from a published architecture")
    p.add_argument("--list-presets", action="store_true", help="print the presets with their counts and exit")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    group = p.add_argument_group("architecture (overrides the preset; see Architecture)")
    for name in _ARCH_FIELDS:
        flag, default = "--" + name.replace("_", "-"), getattr(Architecture, name, None)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif name in ("activation", "dense_activation"):
            group.add_argument(flag, choices=ACTIVATIONS, default=None)
        else:
            group.add_argument(flag, type=int, default=None)
    group = p.add_argument_group("layout (see Layout)")
    group.add_argument("--gpus", type=int, default=8)
    group.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    group.add_argument("--ep", type=int, default=None, help="default: smallest that fits, else largest valid")
    group.add_argument("--dp", type=int, default=None, help="default: gpus // ep")
    group.add_argument("--rank", type=int, default=0, help="the rank to plan (uneven fsdp shards differ)")
    for name in _LAYOUT_FIELDS[4:]:
        flag, default = "--" + name.replace("_", "-"), getattr(Layout, name)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, int):
            group.add_argument(flag, type=int, default=default)
        else:
            allowed = SHARDINGS if name.endswith("sharding") else list(DTYPE_BYTES)
            group.add_argument(flag, choices=allowed, default=default)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the planner's command line (``python -m lightning_moe.plan --help``).

    Args:
        argv: Arguments; default ``sys.argv[1:]``.

    Returns:
        Exit code: 0, or 2 on an invalid architecture or layout (message on stderr).
    """
    args = _parser().parse_args(argv)
    if args.list_presets:
        for name, arch in PRESETS.items():
            c = count_params(arch)
            print(f"{name:<16} {c.total / 1e9:9.1f}B total {c.active / 1e9:7.1f}B active")
        return 0
    try:
        fields = dataclasses.asdict(PRESETS[args.preset]) if args.preset else {}
        overrides = {k: getattr(args, k) for k in _ARCH_FIELDS if getattr(args, k) is not None}
        if args.preset and overrides:
            fields["name"] = f"{args.preset} (modified)"
        fields.update(overrides)
        missing = ", ".join("--" + k.replace("_", "-") for k in _REQUIRED if k not in fields)
        if missing:
            raise ValueError(f"Architecture: {missing} required without --preset; pass them or pick a --preset")
        arch = Architecture(**fields)
        layout = Layout(**{k: getattr(args, k) for k in _LAYOUT_FIELDS if k not in ("gpu_memory", "ep")},
                        gpu_memory=int(args.gpu_memory * GIB), ep=args.ep or 1)  # fmt: skip
        if args.ep is None:
            ep = min_ep_that_fits(arch, layout) or valid_eps(arch, layout.gpus)[-1]
            layout = dataclasses.replace(layout, ep=ep)
        result = plan(arch, layout, args.rank)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0

