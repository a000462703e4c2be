"""This process's memory: resident size now and at peak, page faults, and asking glibc's allocator to give memory back.

One place for what the streaming conversion (pipeline/streaming.py) and the peak-memory
benchmark (bench/memory.py) read and do; Linux /proc and glibc, harmless elsewhere.
"""

from __future__ import annotations

import gc
import resource


def status_mib(field: str) -> float:
    """A /proc/self/status field in MiB (VmRSS: resident now, VmHWM: peak); NaN where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def minor_page_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in without reading from disk)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_mib() -> float:
    """Resident memory now (MiB); the peak so far where /proc is missing."""
    import math

    now = status_mib("VmRSS")
    return peak_rss_mib() if math.isnan(now) else now


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; every arena)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def return_freed_memory() -> None:
    """Ask glibc to map (and unmap on free) blocks of 256 KiB and more instead of keeping them in its heap, then trim.

    Without it the heap keeps the largest activations of every layer after they are freed, and the
    resident memory of a long streaming conversion drifts upwards.
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD
    trim_heap()
