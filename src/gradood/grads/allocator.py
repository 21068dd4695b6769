"""C allocator tuning for CPU runs (docs/design.md, "Performance").

glibc serves large allocations with ``mmap`` and returns them to the OS on ``free``, so every batch
page-faults its big tensors again (zero-filling each page). Keeping freed memory in the heap instead
(``M_MMAP_MAX = 0`` and a high trim threshold) removes that cost; the process then keeps its peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def tune_allocator(trim_threshold: int = 1 << 40) -> bool:
    """Make glibc keep freed memory for reuse (no ``mmap`` for large blocks, no trimming below
    ``trim_threshold`` bytes). Process-wide and irreversible for the allocations it affects; call it once
    at start-up of a scoring or benchmark process. Returns False (and changes nothing) where glibc's
    ``mallopt`` is unavailable (macOS, Windows, musl)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim = min(int(trim_threshold), 2**31 - 1)  # mallopt takes an int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, trim) == 1
    _applied = ok
    return ok
