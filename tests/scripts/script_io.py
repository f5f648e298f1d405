"""The script side of ``tests/launch.py``: where to write, which rank this is, and a traceback on failure.

A script under ``tests/scripts/`` reads its parameters from argv, runs its body through :func:`main` and writes
what the test checks with :func:`write_result`::

    def body() -> None:
        params = json.loads(sys.argv[1])
        ...
        write_result({"loss": loss}, rank=trainer.global_rank)

    if __name__ == "__main__":
        main(body)

Standard library only, so importing it costs nothing.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

OUT_ENV = "LMOE_TEST_OUT"


def out_dir() -> Path:
    """The folder the launcher reads (``$LMOE_TEST_OUT``; the working directory when run by hand)."""
    return Path(os.environ.get(OUT_ENV, "."))


def env_rank() -> int:
    """This process's global rank as its launcher tells it: torchrun's ``RANK``, Lightning's ``LOCAL_RANK``
    (single node), else 0 (the process the test started; spawned workers report through it)."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


def write_result(result: dict, rank: int | None = None) -> Path:
    """Write ``result`` as JSON to ``rank{rank}.json`` in :func:`out_dir` (rank default :func:`env_rank`)."""
    path = out_dir() / f"rank{env_rank() if rank is None else rank}.json"
    path.write_text(json.dumps(result))
    return path


def main(body: Callable[[], object]) -> None:
    """Run ``body``; if it raises, write this rank's traceback to ``rank{r}.traceback`` and exit with 1."""
    try:
        body()
    except BaseException as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        (out_dir() / f"rank{env_rank()}.traceback").write_text(traceback.format_exc())
        traceback.print_exc()
        sys.exit(1)
