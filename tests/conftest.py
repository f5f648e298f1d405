import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

# tests/reference.py and the test helpers are imported by name from the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Scripts run as programs by tests/launch.py (they read argv when imported); --doctest-modules must not import them.
collect_ignore = ["scripts"]


@pytest.fixture(autouse=True)
def _isolate_process_group_and_environment():
    """Each test starts without a process group and with the environment it found.

    An in-process Trainer with a DDP-style strategy (even on one device) initialises a process group
    and writes MASTER_PORT and friends into os.environ. Left behind, the next test's child processes
    inherit a port this process still listens on, and fail with EADDRINUSE.
    """
    environ = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)
