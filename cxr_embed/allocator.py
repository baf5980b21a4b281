"""Let glibc's malloc keep freed memory for the next image instead of handing it back at once.

Every model call on the CPU allocates its activation buffers (megabytes each) and frees them when it
returns; decoding a radiograph does the same with its pixel arrays. By default glibc gives such
blocks back to the kernel as soon as they are freed (large ones are separate mappings; the heaps of
threads other than the main one are deleted when they empty), so the next call maps them afresh and
the kernel zero-fills every page again on first touch. Measured on the 2-core machine, two threads
running the chest-check and main networks: 3,000-25,000 page faults per iteration and up to 20% of
the time in the kernel; with the settings below, 0-50 faults and 8-15% less wall time
(BENCHMARKS.md, "Allocator").

The settings (glibc's mallopt): large blocks come from the heap up to 32 MB instead of from their
own mapping (M_MMAP_THRESHOLD, which also stops glibc from adjusting it), the heap is trimmed only
when 128 MB are free at its top (M_TRIM_THRESHOLD), and it grows and shrinks with 64 MB to spare
(M_TOP_PAD). The cost is memory kept by the process: the peak working set stays resident, plus at
most the pad. They apply to the whole process, once; `CXR_EMBED_MALLOC_TUNING=0` leaves malloc as
it is. Outside glibc (macOS, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from .errors import parse_flag

ENV = "CXR_EMBED_MALLOC_TUNING"
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 128 << 20, M_TOP_PAD: 64 << 20}

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True if they are in effect. ConfigError when
    CXR_EMBED_MALLOC_TUNING is not a flag (`parse_flag`: a typo never turns it on or off silently)."""
    global _applied
    if _applied is not None:
        return _applied
    wanted = parse_flag(ENV, os.environ.get(ENV, "1"))  # ConfigError for a value that is not a flag
    _applied = False
    if not wanted:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: musl's mallopt does nothing
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _applied
