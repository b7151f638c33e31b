"""The supervisor's /metrics page: every worker's metrics as one, plus the supervisor's own.

Workers write their values to files in one directory (prometheus_client's multiprocess mode,
see ``torchwire.metrics``); ``MultiProcessCollector`` reads them at each scrape: counters and
histograms summed over workers, dead workers' counts included, so a total equals the requests
answered; gauges combined as each one declares. The supervisor adds what only it knows: restarts,
which worker has which PID, and the CPU and memory of the worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from torchwire.errors import ConfigError
from torchwire.metrics import serve_metrics


class _WorkerProcesses(Collector):
    """CPU seconds and resident memory of each live worker, read at scrape time."""

    def __init__(self, pids: Callable[[], dict[str, int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "torchwire_worker_cpu_seconds",
            "CPU time (user + system) of each live worker process.",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            "torchwire_worker_resident_memory_bytes",
            "Resident memory of each live worker process.",
            labels=["worker"],
        )
        for index, pid in sorted(self._pids().items()):
            try:
                process = psutil.Process(pid)
                times, memory = process.cpu_times(), process.memory_info()
            except psutil.Error:
                continue  # it just exited
            cpu.add_metric([index], times.user + times.system)
            rss.add_metric([index], memory.rss)
        yield cpu
        yield rss


class FleetMetrics:
    """The supervisor's registry, over the workers' metric files in ``directory``.

    Args:
        directory: where the workers write (their ``PROMETHEUS_MULTIPROC_DIR``).
        pids: the live workers, index to PID, when asked.
    """

    def __init__(self, directory: str, pids: Callable[[], dict[str, int]]) -> None:
        self.directory = directory
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
        self.registry.register(_WorkerProcesses(pids))
        self.restarts = Counter(
            "torchwire_worker_restarts",
            "Workers started again after theirs exited or died, by worker number.",
            ["worker"],
            registry=self.registry,
        )
        self.info = Gauge(
            "torchwire_worker_info",
            "1 for each live worker process: its number and PID.",
            ["worker", "pid"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "torchwire_workers_ready",
            "Workers that have loaded their models and serve.",
            registry=self.registry,
        )
        self._http: Any = None

    def serve(self, host: str, port: int) -> int:
        """Serve the page on ``host:port``; return the bound port."""
        try:
            self._http = serve_metrics(self.registry, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        bound: int = self._http.server_port
        return bound

    def worker_started(self, index: int | str, pid: int) -> None:
        self.info.labels(str(index), str(pid)).set(1)

    def worker_exited(self, index: int | str, pid: int) -> None:
        """Forget the dead worker's live gauges (its counts stay in the totals)."""
        self.info.remove(str(index), str(pid))
        mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
