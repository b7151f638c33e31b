"""The step threads: where a Python model's ``preprocess`` and ``postprocess`` run, one request
each, in parallel with each other and with the model's batches, never on the event loop or an
inference thread (a JPEG decoded there would hold up every batch behind it)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from torchwire.config import available_cores

log = logging.getLogger(__name__)


class StepPool:
    """Daemon threads taking work from one queue: like the inference threads, a step stuck in a
    model's code cannot keep the process from exiting (``ThreadPoolExecutor`` joins its threads
    at exit). Each piece of work must answer its caller itself, errors included; one that
    raises anyway is logged and the thread goes on."""

    def __init__(self, threads: int) -> None:
        self._work: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        for index in range(threads):
            threading.Thread(target=self._run, name=f"torchwire-step-{index}", daemon=True).start()

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        self._work.put((function, args))

    def _run(self) -> None:
        while True:
            function, args = self._work.get()
            try:
                function(*args)
            except BaseException:
                log.exception("a step raised past its own handling")


_pool: StepPool | None = None
_lock = threading.Lock()


def step_pool() -> StepPool:
    """The process's step threads (made on first use): one per core this process may use, at
    least two, since decoders (Pillow's, numpy's) release the GIL while they work."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = StepPool(max(2, available_cores()))
        return _pool
