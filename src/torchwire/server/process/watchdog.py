"""The memory watchdog: reports NOT_SERVING while the host, this process or a GPU runs short of
memory, and keeps the memory gauges (host and GPU) current.

Every ``interval_s`` it reads the host's available memory, this process's RSS when a limit is set,
and every GPU the models use (``runtime.gpu``). It trips when available memory falls under
``min_available_bytes``, RSS exceeds ``max_rss_bytes``, or a GPU has less than
``min_gpu_available_bytes`` available to the server, and recovers only once each is back on the
right side of its line by ``recover_margin_bytes``, so it does not flap around the line. Each
transition is logged and counted. The thresholds are attributes: change them live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil

from torchwire.metrics import Metrics
from torchwire.runtime.gpu import GpuReading, observe_gpus, read_gpus

log = logging.getLogger(__name__)
MIB = 1024 * 1024


def _available() -> int:
    return int(psutil.virtual_memory().available)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class _Reading:
    available: int
    rss: int
    gpus: list[GpuReading]


class MemoryWatchdog:
    """Calls ``on_change(ok)`` on each transition; ``healthy`` holds the current state.

    ``read_gpus`` is where GPU readings come from (``runtime.gpu.read_gpus``; a test without a
    GPU may give its own).
    """

    def __init__(
        self,
        on_change: Callable[[bool], Awaitable[None]],
        metrics: Metrics,
        interval_s: float = 5.0,
        min_available_bytes: int = 1024 * MIB,
        recover_margin_bytes: int = 256 * MIB,
        max_rss_bytes: int = 0,
        min_gpu_available_bytes: int = 0,
        read_gpus: Callable[[], list[GpuReading]] = read_gpus,
    ) -> None:
        self.interval_s = interval_s
        self.min_available_bytes = min_available_bytes
        self.recover_margin_bytes = recover_margin_bytes
        self.max_rss_bytes = max_rss_bytes
        self.min_gpu_available_bytes = min_gpu_available_bytes
        self.read_gpus = read_gpus
        self.healthy = True
        self._on_change = on_change
        self._metrics = metrics
        self._stop = asyncio.Event()
        self.readings = 0
        """Readings taken so far (tests and diagnostics wait on it)."""

    def _judge(self, reading: _Reading) -> bool:
        margin = 0 if self.healthy else self.recover_margin_bytes
        limit, gpu_floor = self.max_rss_bytes, self.min_gpu_available_bytes
        gpu_short = any(g.available_bytes < gpu_floor + margin for g in reading.gpus)
        return (
            reading.available >= self.min_available_bytes + margin
            and not (limit and reading.rss > max(0, limit - margin))
            and not (gpu_floor and gpu_short)
        )

    def _observe(self, reading: _Reading) -> None:
        metrics = self._metrics
        metrics.memory_available.set(reading.available)
        observe_gpus(metrics, reading.gpus)

    def _describe(self, reading: _Reading) -> str:
        parts = [
            f"available {reading.available // MIB} MiB, threshold {self.min_available_bytes // MIB}"
            " MiB"
        ]
        if self.max_rss_bytes:
            parts.append(f"rss {reading.rss // MIB} MiB of {self.max_rss_bytes // MIB} MiB")
        if self.min_gpu_available_bytes:
            parts += [
                f"{g.device} available {g.available_bytes // MIB} MiB, threshold "
                f"{self.min_gpu_available_bytes // MIB} MiB"
                for g in reading.gpus
            ]
        return "; ".join(parts)

    async def check(self) -> bool:
        """Read memory once and act on a transition; return whether memory is fine."""
        reading = _Reading(
            available=_available(),
            rss=_rss() if self.max_rss_bytes else 0,
            gpus=await asyncio.to_thread(self.read_gpus),
        )
        self._observe(reading)
        healthy = self._judge(reading)
        if healthy != self.healthy:
            self.healthy = healthy
            state = "serving" if healthy else "not_serving"
            self._metrics.watchdog_transitions.labels(state).inc()
            log.warning(
                "memory watchdog: %s (%s)",
                "recovered, SERVING" if healthy else "low memory, NOT_SERVING",
                self._describe(reading),
            )
            await self._on_change(healthy)
        self.readings += 1  # once acted on
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
