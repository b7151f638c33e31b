"""Process-wide settings of the C runtime under torchwire: glibc's malloc arenas.

glibc gives each thread that allocates concurrently its own arena, up to 8 per core; a server's
threads (event loop, gRPC's, inference, metrics) then leave memory fragmented across arenas,
and the resident size creeps up under load. Capping the arenas (as ``MALLOC_ARENA_MAX`` does)
halved that creep in ``benchmarks/soak.py`` at the same throughput. Called before the process
starts its threads; elsewhere than glibc, nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
M_ARENA_MAX = -8  # glibc's mallopt parameter


def cap_malloc_arenas(count: int) -> bool:
    """At most ``count`` malloc arenas from now on (0: glibc's default); True if it took."""
    if count <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator rules
        log.debug("mallopt is not available: malloc arenas left as they are")
        return False
