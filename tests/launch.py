"""Start a test script in its own process and read what each of its ranks wrote.

Inside pytest, Lightning's popen launcher re-runs the pytest command line in every child rank, so multi-process
tests run a script file under ``tests/scripts/`` as its own program (DESIGN.md section 5). The script takes its
parameters from argv (JSON where they are structured), wraps its body in :func:`script_io.main` and writes
its results with :func:`script_io.write_result`; :func:`run_script` starts it once (Lightning, torchrun or
the script itself starts the other ranks), reads every rank's ``rank{r}.json``, and on failure raises with the
traceback of every rank that failed, then the tail of the output.

    run = run_script("dry_run_step.py", json.dumps(params), out=tmp_path)   # -> run.results[0]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
SCRIPTS_DIR = TESTS_DIR / "scripts"
ROOT = TESTS_DIR.parent
OUT_ENV = "LMOE_TEST_OUT"  # where script_io writes results and tracebacks


@dataclass
class ScriptRun:
    """A finished script: its exit code, output, and the JSON result of each rank (rank order)."""

    returncode: int
    stdout: str
    stderr: str
    results: list[dict]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_script(script: str | Path, *args: str, out: Path, ranks: int = 1, launcher: Sequence[str] = (),
               env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 240,
               check: bool = True) -> ScriptRun:
    """Run ``[*launcher or python] script *args`` with ``out`` as its output folder.

    Args:
        script: A file name under ``tests/scripts/`` or a path (an example script, a script written by a test).
        *args: Its command-line arguments (strings; JSON for structured parameters).
        out: Folder the ranks write ``rank{r}.json`` (and ``rank{r}.traceback`` on failure) to; also passed as
            the environment variable ``LMOE_TEST_OUT``.
        ranks: How many ``rank{r}.json`` files to read; 0 reads none.
        launcher: A command that starts the script instead of ``python`` (``[python, -m, torch.distributed.run,
            --nproc-per-node, 2]``).
        env: Extra environment variables (the repository and ``tests/`` are put on ``PYTHONPATH``).
        cwd: Working directory; default ``out``.
        timeout: Seconds before the run is killed.
        check: Raise ``AssertionError`` on a non-zero exit, a rank's traceback or a missing result.

    Returns:
        The finished run.
    """
    path = Path(script) if Path(script).is_absolute() else SCRIPTS_DIR / script
    out.mkdir(parents=True, exist_ok=True)
    python_path = os.pathsep.join([str(ROOT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env = {**os.environ, "PYTHONPATH": python_path, "PYTHONWARNINGS": "ignore", OUT_ENV: str(out),
                **(env or {})}
    full_env.pop("LOCAL_RANK", None)  # this process may itself be a rank of an in-process Trainer test
    cmd = [*(launcher or [sys.executable]), str(path), *args]
    proc = subprocess.run(cmd, cwd=cwd or out, env=full_env, capture_output=True, text=True, timeout=timeout)
    missing = [r for r in range(ranks) if not (out / f"rank{r}.json").exists()]
    tracebacks = sorted(out.glob("rank*.traceback"))
    if check and (proc.returncode != 0 or missing or tracebacks):
        raise AssertionError(_failure(cmd, proc, missing, tracebacks))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks) if r not in missing]
    return ScriptRun(proc.returncode, proc.stdout, proc.stderr, results)


def _failure(cmd: list[str], proc: subprocess.CompletedProcess, missing: list[int], tracebacks: list[Path]) -> str:
    lines = [f"{' '.join(cmd)} exited with {proc.returncode}"]
    for path in tracebacks:
        lines += [f"--- {path.stem} failed:", path.read_text().rstrip()]
    if missing:
        lines.append(f"--- no result from rank(s) {missing}")
    lines += ["--- output (tail):", (proc.stdout + proc.stderr)[-6000:]]
    return "\n".join(lines)

