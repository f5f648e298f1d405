"""The peer watchdog: ranks started by Lightning's popen launcher stop when the launching rank 0 is gone.

Lightning's launcher already kills every rank when a started rank fails. The other direction is
ours: when rank 0 raises and exits, the ranks it started may sit in a collective that never
completes (NCCL waits for the process-group timeout, 30 minutes by default).
:class:`WatchedScriptLauncher` tells the ranks it starts the launcher's pid;
:func:`start_peer_watchdog`, called by each rank once the environment is set up, exits the rank
once that process is gone. torchrun and SLURM (``srun --kill-on-bad-exit=1``) stop ranks themselves.

Every rank also destroys its process groups at exit (:func:`destroy_process_groups_at_exit`), whatever the
backend: Lightning does it for NCCL only, and a gloo rank whose groups live into interpreter finalization can
abort there ("terminate called without an active exception", exit code -6) after training finished.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import time
import weakref
from typing import Any

import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment
from typing_extensions import override

from lightning_moe import _compat

PEER_FAILURE_GRACE_S = 5.0  # a rank whose launcher died exits after this long if it has not failed by itself
PARENT_PID_ENV = "LIGHTNING_MOE_LAUNCHER_PID"
WATCHDOG_THREAD = "lightning-moe-peer-watchdog"


class WatchedScriptLauncher(_compat.SubprocessScriptLauncher):
    """Lightning's popen launcher, telling the ranks it starts who started them (for the peer watchdog)."""

    @override
    def _call_children_scripts(self) -> None:
        os.environ[PARENT_PID_ENV] = str(os.getpid())
        super()._call_children_scripts()


def watched(launcher: Any, cluster_environment: ClusterEnvironment | None, num_processes: int, num_nodes: int) -> Any:
    """``launcher`` itself, or a :class:`WatchedScriptLauncher` in its place when it is Lightning's popen launcher."""
    if type(launcher) is _compat.SubprocessScriptLauncher and cluster_environment is not None:
        return WatchedScriptLauncher(cluster_environment, num_processes, num_nodes)
    return launcher


def launcher_gone(parent_pid: int | None) -> bool:
    """True when this rank was started by a launcher process that no longer exists (we were re-parented)."""
    return parent_pid is not None and os.getppid() != parent_pid


def start_peer_watchdog() -> None:
    """In a rank started by :class:`WatchedScriptLauncher`: exit with code 1 once the launching rank 0 is gone.

    gloo notices a closed connection by itself, so the watchdog first gives the normal error path
    ``PEER_FAILURE_GRACE_S``. A no-op in the launching process, in ranks started otherwise, and
    when the watchdog already runs.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or int(parent) == os.getpid() or any(t.name == WATCHDOG_THREAD for t in threading.enumerate()):
        return
    parent_pid = int(parent)

    def watch() -> None:
        while not launcher_gone(parent_pid):
            time.sleep(0.5)
        time.sleep(PEER_FAILURE_GRACE_S)
        sys.stderr.write(f"MoEStrategy: the launching rank-0 process {parent_pid} exited; this rank "
                         f"(pid {os.getpid()}) stops instead of waiting for it in a collective.\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name=WATCHDOG_THREAD, daemon=True).start()


# Objects whose release_process_groups() drops the references they hold to process groups (a strategy's device
# meshes hold their groups): at exit they let go first, so that destroying the groups really frees them.
_group_holders: weakref.WeakSet[Any] = weakref.WeakSet()
_registered = False


def _destroy_process_groups() -> None:
    for holder in list(_group_holders):
        holder.release_process_groups()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the last references go now: each gloo group's destructor joins its worker threads here


def destroy_process_groups_at_exit(holder: Any = None) -> None:
    """Destroy this process's process groups at exit, while the interpreter is still whole (idempotent).

    A gloo group's worker threads drop the last reference to each finished collective's tensors; one doing so
    while the interpreter finalizes cannot take the GIL and aborts the process. Destroying every group in an
    ``atexit`` handler, once nothing else holds them, joins those threads first. ``destroy_process_group``
    alone does not stop them while a reference remains (a ``DeviceMesh`` keeps its groups, an expert-parallel
    dispatcher its expert group): ``holder``, kept by weak reference, has ``release_process_groups()`` called
    first. A no-op at exit for groups the user destroyed already.
    """
    global _registered
    if holder is not None:
        _group_holders.add(holder)
    if not _registered:  # once: exit handlers registered later (a user's final barrier) still run before it
        atexit.register(_destroy_process_groups)
        _registered = True
