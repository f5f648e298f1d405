"""Whether the process groups are gone before interpreter finalization, for tests/test_reliability.py.

Usage: ``python process_group_exit.py``. A 2-rank ``strategy="moe"`` fit (expert parallel: the overlapped
exchange runs); on each rank an atexit handler registered before the trainer is created (so it runs after
every handler the strategy registers) writes ``{"initialized": ..., "gloo_threads": [...]}`` to
``exit_rank{r}.json`` in the output folder.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from script_io import env_rank, main, out_dir  # noqa: E402


def at_exit() -> None:
    threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(out_dir() / f"exit_rank{env_rank()}.json", "w") as f:
        json.dump({"initialized": dist.is_initialized(), "gloo_threads": [t for t in threads if "gloo" in t]}, f)


def body() -> None:
    from helpers import RegressionData, TinyMoE, make_trainer

    # Registered first, so it runs after every handler the strategy registers (atexit runs last-in first-out).
    atexit.register(at_exit)
    trainer, model = make_trainer(strategy="moe", devices=2, max_steps=2), TinyMoE()
    trainer.fit(model, RegressionData())
    assert dist.is_initialized()  # the group outlives fit, as under Lightning's DDP


if __name__ == "__main__":
    main(body)
