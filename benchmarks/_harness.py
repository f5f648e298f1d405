"""Side-by-side timing on a shared machine: each implementation in its own process, steps interleaved in time.

Implementations measured in one process disturb each other through the allocator (glibc's adaptive mmap and
trim thresholds hand one implementation fresh, page-faulting memory depending on what the previous one
freed) and the caches. Here every implementation is a worker process that builds its model once and then
runs one step each time the driver asks; the driver asks each worker in turn, round after round (order
rotated), so the load of the machine drifts alike for all of them, and reports per implementation:

- ``wall``/``cpu``: median wall-clock and process CPU seconds of a step (CPU time counts every thread of the
  worker and none of the time the scheduler gave to other processes: the steadier of the two when the
  machine is shared);
- ``wall_x``/``cpu_x``: median over rounds of the ratio to the reference implementation's step of the
  same round.

A benchmark script is both driver and worker::

    if args.worker:                       # started by the driver: build, then serve steps
        serve(make_step(args.worker))
    results = interleaved({"loop": [...argv...], "ours": [...]}, repeats=15, reference="loop")
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence


def serve(step: Callable[[], None], warmup: int = 2) -> None:
    """Worker side: run ``warmup`` steps, say ready, then one timed step per ``step`` line on stdin."""
    for _ in range(warmup):
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - start_cpu}), flush=True)


class _Worker:
    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})

    def wait_ready(self) -> None:
        for line in self._stdout():
            if line.strip() == "ready":
                return
        raise RuntimeError(f"worker {self.name!r} exited before it was ready (code {self.proc.wait()})")

    def step(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        for line in self._stdout():
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.name!r} exited during a step (code {self.proc.wait()})")

    def _stdout(self):
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if not line.startswith("{") and line.strip() != "ready":
                print(f"  [{self.name}] {line.rstrip()}", file=sys.stderr)  # the worker's own output
                continue
            yield line

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def interleaved(workers: Mapping[str, Sequence[str]], repeats: int, reference: str | None = None,
                env: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Start one worker per ``name: argv`` (``python *argv``), then time ``repeats`` interleaved rounds.

    Workers start one after the other (each builds and warms up alone), so start-up does not overlap a step.

    Returns:
        Per name: ``wall``, ``cpu`` (median seconds) and, with a ``reference``, ``wall_x``, ``cpu_x``.
    """
    started: dict[str, _Worker] = {}
    try:
        for name, argv in workers.items():
            started[name] = _Worker(name, argv, env)
            started[name].wait_ready()
        names = list(started)
        series: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                timing = started[name].step()
                for key in ("wall", "cpu"):
                    series[name][key].append(timing[key])
    finally:
        for worker in started.values():
            worker.close()
    out = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in series.items()}
    if reference is not None:
        for name in names:
            for key in ("wall", "cpu"):
                out[name][f"{key}_x"] = statistics.median(
                    a / b for a, b in zip(series[name][key], series[reference][key], strict=True))
    return out


def load_average() -> float:
    """The 1-minute load average (what else the machine was doing)."""
    return os.getloadavg()[0]
