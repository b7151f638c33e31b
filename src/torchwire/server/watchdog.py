"""The memory watchdog: reports NOT_SERVING while the host (or this process) runs short of memory.

Every ``interval_s`` it reads the host's available memory (and, when a limit is set, this process's
RSS). It trips when available memory falls under ``min_available_bytes`` (or RSS exceeds
``max_rss_bytes``) and recovers only once available memory is back above the threshold plus
``recover_margin_bytes`` (and RSS under its limit minus the margin), so it does not flap around the
line. Each transition is logged and counted. The thresholds are attributes: change them live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psutil

from torchwire.metrics import Metrics

log = logging.getLogger(__name__)
MIB = 1024 * 1024


def _available() -> int:
    return int(psutil.virtual_memory().available)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


class MemoryWatchdog:
    """Calls ``on_change(ok)`` on each transition; ``healthy`` holds the current state."""

    def __init__(
        self,
        on_change: Callable[[bool], Awaitable[None]],
        metrics: Metrics,
        interval_s: float = 5.0,
        min_available_bytes: int = 1024 * MIB,
        recover_margin_bytes: int = 256 * MIB,
        max_rss_bytes: int = 0,
    ) -> None:
        self.interval_s = interval_s
        self.min_available_bytes = min_available_bytes
        self.recover_margin_bytes = recover_margin_bytes
        self.max_rss_bytes = max_rss_bytes
        self.healthy = True
        self._on_change = on_change
        self._metrics = metrics
        self._stop = asyncio.Event()

    def _judge(self, available: int, rss: int) -> bool:
        limit = self.max_rss_bytes
        if self.healthy:
            return available >= self.min_available_bytes and not (limit and rss > limit)
        margin = self.recover_margin_bytes
        rss_ok = not limit or rss <= max(0, limit - margin)
        return available >= self.min_available_bytes + margin and rss_ok

    async def check(self) -> bool:
        """Read memory once and act on a transition; return whether memory is fine."""
        available, rss = _available(), (_rss() if self.max_rss_bytes else 0)
        self._metrics.memory_available.set(available)
        healthy = self._judge(available, rss)
        if healthy != self.healthy:
            self.healthy = healthy
            state = "serving" if healthy else "not_serving"
            self._metrics.watchdog_transitions.labels(state).inc()
            log.warning(
                "memory watchdog: %s (available %d MiB, threshold %d MiB%s)",
                "recovered, SERVING" if healthy else "low memory, NOT_SERVING",
                available // MIB,
                self.min_available_bytes // MIB,
                f", rss {rss // MIB} MiB of {self.max_rss_bytes // MIB} MiB"
                if self.max_rss_bytes
                else "",
            )
            await self._on_change(healthy)
        return healthy

    async def run(self) -> None:
        """Check every ``interval_s`` until ``stop``."""
        while not self._stop.is_set():
            try:
                await self.check()
            except Exception:  # a failed read must not end the watchdog
                log.exception("memory watchdog check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    def stop(self) -> None:
        self._stop.set()
