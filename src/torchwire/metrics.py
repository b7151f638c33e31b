"""Prometheus metrics, named as in design.md §3, each server with its own registry.

Durations are observed around the awaited work itself (never a decorator on an ``async def``,
which would time the creation of a coroutine): request time from the moment a call starts to the
moment its answer is ready, queue time from enqueue to the start of its batch, compute time of the
model call. Buckets run from 100 µs to 10 s.
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ModelMetrics:
    """The per-model children a batcher observes from its inference threads."""

    queue_duration: Histogram
    compute_duration: Histogram
    batch_size: Histogram
    queue_full: Counter
    too_late: Counter
    """Refused at admission: the queue ahead would outlast the call's deadline."""
    engine_batch_size: Histogram | None = None
    """In an engine process: its batch sizes, all models together."""


class Metrics:
    """Every metric torchwire exports, registered in one registry."""

    def __init__(self, process_metrics: bool = True, engine: str = "") -> None:
        self.engine = engine
        """The device whose engine this process is ("" in a server or worker)."""
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)
        registry = self.registry
        self.requests = Counter(
            "torchwire_requests",
            "Requests answered, by model, version, API and gRPC status code.",
            ["model", "version", "api", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "torchwire_request_duration_seconds",
            "Server time of a request, from its arrival to its answer being ready.",
            ["model", "api"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "torchwire_queue_duration_seconds",
            "Time a request waited in its model's queue before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "torchwire_compute_duration_seconds",
            "Time of one model call on a batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "torchwire_batch_size",
            "Items per model call.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "torchwire_rejected_requests",
            "Requests refused for load (RESOURCE_EXHAUSTED) before any work, by model and reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.denied = Counter(
            "torchwire_denied_requests",
            "Calls refused by access control, by API and reason (unauthenticated, "
            "permission_denied).",
            ["api", "reason"],
            registry=registry,
        )
        self.inflight = Gauge(
            "torchwire_inflight_requests",
            "Requests being served (queued, computing or being answered), summed over workers.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.engine_requests = Gauge(
            "torchwire_engine_requests",
            "Requests inside an engine process (queued, computing or being answered), by the "
            "engine's device.",
            ["engine"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.engine_batch_size = Histogram(
            "torchwire_engine_batch_size",
            "Items per model call in an engine process, all its models, by the engine's device.",
            ["engine"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.engine_crossing = Histogram(
            "torchwire_engine_crossing_seconds",
            "Time a request spent crossing between a worker and its engine, both ways (the "
            "engine's own time taken out), by the engine's device.",
            ["engine"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_loads = Counter(
            "torchwire_model_loads",
            "Model version loads, by outcome (ok or failed).",
            ["model", "outcome"],
            registry=registry,
        )
        self.model_version = Gauge(
            "torchwire_model_version",
            "The version that answers requests naming no version (the highest any worker serves).",
            ["model"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.watchdog_transitions = Counter(
            "torchwire_watchdog_transitions",
            "Memory watchdog changes of state (to serving or not_serving).",
            ["state"],
            registry=registry,
        )
        self.memory_available = Gauge(
            "torchwire_memory_available_bytes",
            "Host memory available, as the watchdog last read it (the lowest of the workers').",
            registry=registry,
            multiprocess_mode="livemin",
        )

        # GPUs (set by the watchdog from runtime.gpu readings; absent on a CPU-only server).
        self.gpu_memory_used = Gauge(
            "torchwire_gpu_memory_used_bytes",
            "GPU memory held by the server's tensors, by device (summed over workers).",
            ["device"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.gpu_memory_reserved = Gauge(
            "torchwire_gpu_memory_reserved_bytes",
            "GPU memory held by the server's caching allocator, used or cached (summed over "
            "workers).",
            ["device"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.gpu_memory_total = Gauge(
            "torchwire_gpu_memory_total_bytes",
            "GPU memory of the device.",
            ["device"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.gpu_memory_free = Gauge(
            "torchwire_gpu_memory_free_bytes",
            "GPU memory free on the device, whoever uses the rest.",
            ["device"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.gpu_utilization = Gauge(
            "torchwire_gpu_utilization_ratio",
            "Fraction of time a kernel ran on the device (NVML; absent without nvidia-ml-py).",
            ["device"],
            registry=registry,
            multiprocess_mode="livemax",
        )

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(
            self.queue_duration.labels(model),
            self.compute_duration.labels(model),
            self.batch_size.labels(model),
            self.rejected.labels(model, "queue_full"),
            self.rejected.labels(model, "deadline"),
            self.engine_batch_size.labels(self.engine) if self.engine else None,
        )


METRICS_THREADS = 16
"""Most scrapes served at once by one /metrics endpoint; more connections wait to be accepted."""
METRICS_IO_TIMEOUT_S = 5.0
"""An idle or stalled /metrics connection is dropped after this long (it holds a thread)."""


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_IO_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's threaded WSGI server with bounds: at most ``METRICS_THREADS``
    connections are served at once (the accept loop waits for a free one) and each is dropped
    after ``METRICS_IO_TIMEOUT_S`` of silence, so idle clients cannot pile up threads."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_THREADS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went silent or away is routine here, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):  # TimeoutError, ConnectionError, ...
            super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsHTTPServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread (``shutdown()``
    and ``server_close()`` stop it). Raises ``OSError`` when the port cannot be bound."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (MetricsHTTPServer,), {"address_family": family})
    server: MetricsHTTPServer = make_server(
        host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
