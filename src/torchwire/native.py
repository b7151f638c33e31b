"""Process-wide settings of the C runtime under torchwire: glibc's malloc.

1. Arenas. glibc gives each thread that allocates concurrently its own arena, up to 8 per core;
   a server's threads (event loop, gRPC's, inference, metrics) then leave memory fragmented
   across arenas, and the resident size creeps up under load. Capping the arenas (as
   ``MALLOC_ARENA_MAX`` does) halved that creep in ``benchmarks/soak.py`` at the same throughput.
2. Freed memory kept for reuse. By default glibc serves blocks above a threshold that it moves
   (128 kB up to 32 MB) with fresh ``mmap`` pages and returns the top of a heap to the system
   once it passes twice that; a model's activations and each batch's inputs, allocated and freed
   at every call, then page-fault their memory in again at every call. Fixing both thresholds
   keeps that memory in the process (docs/operations.md, "Memory").

Both are set before the process starts its threads; elsewhere than glibc, nothing happens; a
threshold set in the environment (``MALLOC_*_``, ``GLIBC_TUNABLES``) is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)
# glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 << 20
"""The largest mmap threshold glibc accepts on 64-bit: bigger blocks are always mapped afresh."""
INT_MAX = 2**31 - 1


def tune_malloc(arenas: int, keep_mb: int) -> None:
    """``cap_malloc_arenas`` and ``keep_freed_memory``: what ``--malloc-arenas`` and
    ``--malloc-keep-mb`` ask of a server's process."""
    cap_malloc_arenas(arenas)
    keep_freed_memory(keep_mb)


def cap_malloc_arenas(count: int) -> bool:
    """At most ``count`` malloc arenas from now on (0: glibc's default); True if it took."""
    if count <= 0:
        return False
    return _mallopt((M_ARENA_MAX, count))


def keep_freed_memory(mb: int) -> bool:
    """Keep up to ``mb`` MB of freed memory at the top of each heap for reuse, and serve blocks
    of up to ``min(mb, 32)`` MB from the heaps (0: glibc's moving defaults); True if it took."""
    if mb <= 0:
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen = [k for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_") if k in os.environ]
    if chosen or "malloc.trim_threshold" in tunables or "malloc.mmap_threshold" in tunables:
        log.debug("malloc thresholds set in the environment: left as they are")
        return False
    size = min(mb << 20, INT_MAX)  # mallopt takes a C int
    return _mallopt((M_MMAP_THRESHOLD, min(size, MMAP_THRESHOLD_MAX)), (M_TRIM_THRESHOLD, size))


def _mallopt(*settings: tuple[int, int]) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        took = all([bool(libc.mallopt(param, value)) for param, value in settings])
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator rules
        log.debug("mallopt is not available: malloc left as it is")
        return False
    if not took:
        log.debug("mallopt refused one of %s", settings)
    return took
