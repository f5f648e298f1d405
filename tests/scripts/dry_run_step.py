"""One rank's dry-run training step in a fresh process, for tests/test_dry_run.py.

RSS only grows with new allocations: after other tests freed memory in the pytest process, glibc serves the
rank's tensors from pages it kept, and the measured growth reads 0. A fresh process measures.

Usage: ``python dry_run_step.py '{"arch": {...}, "layout": {...}, "rank": 5, "steps": 2}'`` (Architecture and
Layout fields as JSON); writes the :class:`~lightning_moe.dry_run.SimulationReport` fields to ``rank0.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from script_io import main, write_result


def body() -> None:
    from lightning_moe.dry_run import simulate_step
    from lightning_moe.plan import Architecture, Layout

    params = json.loads(sys.argv[1])
    report = simulate_step(Architecture(**params["arch"]), Layout(**params["layout"]), rank=params["rank"],
                           steps=params["steps"])
    write_result(dataclasses.asdict(report), rank=0)


if __name__ == "__main__":
    main(body)
