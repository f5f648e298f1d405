"""Whether the process groups are gone before interpreter finalization, for tests/test_reliability.py.

Usage: ``python process_group_exit.py <json path>``. A single-process ``strategy="moe"`` fit; an atexit
handler registered before the trainer is created (so it runs after every handler the strategy registers)
writes ``{"initialized": ..., "gloo_threads": [...]}`` to the path.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from script_io import main  # noqa: E402


def at_exit(path: str) -> None:
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(path, "w") as f:
        json.dump({"initialized": dist.is_initialized(), "gloo_threads": [t for t in threads if "gloo" in t]}, f)


def body() -> None:
    from helpers import RegressionData, TinyMoE, make_trainer

    # Registered first, so it runs after every handler the strategy registers (atexit runs last-in first-out).
    atexit.register(at_exit, sys.argv[1])
    trainer, model = make_trainer(strategy="moe"), TinyMoE()
    trainer.fit(model, RegressionData())
    assert dist.is_initialized()  # the group outlives fit, as under Lightning's DDP


if __name__ == "__main__":
    main(body)
