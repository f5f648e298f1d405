"""Two ranks the way Lightning's popen launcher makes them (rank 0 re-runs this file with ``LOCAL_RANK=1``),
no torch: for tests/test_launch.py.

Usage: ``python two_ranks.py <failing rank or -1>``; each surviving rank writes ``{"rank": r}``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from script_io import env_rank, main, write_result


def body() -> None:
    failing, rank = int(sys.argv[1]), env_rank()
    child = None
    if rank == 0:
        child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env={**os.environ, "LOCAL_RANK": "1"})
    if rank == failing:
        raise RuntimeError(f"rank {rank} fails on purpose")
    write_result({"rank": rank})
    if child is not None and child.wait() != 0:
        raise SystemExit(f"rank 1 exited with {child.returncode}")


if __name__ == "__main__":
    main(body)
