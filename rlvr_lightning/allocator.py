"""Keep large freed CPU buffers in the process heap instead of returning them to the OS.

glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB by default)
with fresh pages from the kernel and unmaps them on ``free``. An RL step allocates and frees
tensors of hundreds of MiB many times (logits of a micro-batch, their float32 copies and
gradients), and every fresh page costs a page fault on first touch: on this project's 2-core
CPU, writing a fresh 200 MiB tensor took 4x as long as writing into a reused one. Raising the
mmap and trim thresholds makes ``free`` keep those buffers for the next allocation. The price is
that the process's resident memory stays near its peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold_mib: int | None) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold_mib`` MiB (``None``: leave them).

    Returns whether the thresholds were set: ``False`` off Linux/glibc (nothing to do there)."""
    if threshold_mib is None:
        return False
    if not 1 <= threshold_mib <= 2047:
        raise ValueError(f"malloc_threshold_mib={threshold_mib} must be in [1, 2047] (MiB), or null")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    value = ctypes.c_int(threshold_mib * 2**20)
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))
