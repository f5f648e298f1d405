"""Run a multi-process Trainer script in a subprocess and read what each rank wrote.

Inside pytest, Lightning's popen launcher re-runs the pytest command line in every child rank, so
multi-process Trainer tests write a script and run it as its own program (DESIGN.md section 5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = os.path.dirname(__file__)


def run_rank_script(tmp_path: Path, name: str, template: str, ranks: int = 2, timeout: float = 240) -> list[dict]:
    """Write ``template`` (formatted with ``tests`` and ``out``) to ``tmp_path/name``, run it, and
    return the JSON each rank wrote to ``out/rank{r}.json``."""
    script = tmp_path / name
    script.write_text(template.format(tests=TESTS_DIR, out=str(tmp_path)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
