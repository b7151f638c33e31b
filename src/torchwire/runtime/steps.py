"""The step threads: where a Python model's ``preprocess`` and ``postprocess`` run, one request
each, in parallel with each other and with the model's batches, never on the event loop or an
inference thread (a JPEG decoded there would hold up every batch behind it)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from torchwire.config import available_cores

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def step_pool() -> ThreadPoolExecutor:
    """The process's step threads (made on first use): one per core this process may use, at
    least two, since decoders (Pillow's, numpy's) release the GIL while they work."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(2, available_cores()), thread_name_prefix="torchwire-step"
            )
        return _pool
