"""Process memory readings (Linux): current RSS and a resettable peak RSS.

CPU tensors have no allocator statistics, so the benchmarks and the one-rank simulation measure
memory as the growth of peak RSS (``VmHWM``) over one step, after resetting the peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux: write 5 to ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak RSS since the process started or since :func:`reset_peak_rss`.

    Raises:
        RuntimeError: when ``/proc/self/status`` has no ``VmHWM`` line (not Linux).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (peak memory needs Linux)")


def mmap_large_allocations(threshold: int = 1 << 16) -> None:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mapping, for the rest of the
    process (``mallopt(M_MMAP_THRESHOLD)``): freed tensors then leave RSS at once and RSS follows live memory
    (without it, freed activations stay in the heap and RSS over-reads, ~8% in the dry run). Large allocations
    get a little slower: use it in a process of its own.

    Raises:
        RuntimeError: without glibc's ``mallopt``.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt") or libc.mallopt(-3, threshold) != 1:  # -3: M_MMAP_THRESHOLD
        raise RuntimeError("mmap_large_allocations needs glibc's mallopt (Linux)")
