"""One torchwire server process: start-up, serving and shutdown, each its own method.

Start-up binds the port first with health NOT_SERVING (so probes get an answer while models load),
starts /metrics and the memory watchdog, loads every model, then turns health SERVING. Shutdown runs
in order: health NOT_SERVING, (after the shutdown delay) stop accepting calls, let in-flight calls
finish within the grace period, cancel the rest, then stop the batchers and their threads.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from tritonclient.grpc import service_pb2

from torchwire.config import ServerSettings
from torchwire.errors import ConfigError, DeviceFailedError
from torchwire.metrics import Metrics, serve_metrics
from torchwire.repository import (
    ModelRepository,
    RepositoryWatcher,
    Scanner,
    ensure_demo_repository,
    snapshot,
)
from torchwire.server.common.auth import Access, TokenInterceptor
from torchwire.server.common.health import Health
from torchwire.server.common.observe import Observer
from torchwire.server.common.shm import Regions
from torchwire.server.common.tls import TlsFiles
from torchwire.server.http import HttpApi, HttpFrontend
from torchwire.server.plane import kserve
from torchwire.server.process.role import LoneServer, Role
from torchwire.server.process.watchdog import MIB, MemoryWatchdog
from torchwire.server.rpc import native as native_front
from torchwire.server.rpc.connections import connection_limits
from torchwire.server.rpc.drain import Drain
from torchwire.server.rpc.reflection import reflection_pool
from torchwire.server.rpc.seed import SEED_SERVICE, SeedServicer
from torchwire.server.rpc.v2 import V2_SERVICE, V2Servicer

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"


def scanner_for(settings: ServerSettings) -> Scanner:
    """What to serve: ``--repository``, else ``--model``, else the built-in demo repository."""
    if settings.repository and settings.model:
        raise ConfigError("give --repository or --model, not both")
    if settings.model:
        return Scanner(model_file=settings.model, input_shape=settings.input_shape)
    return Scanner(root=Path(settings.repository or ensure_demo_repository(settings.cache_dir)))


THREAD_STOP_S = 2.0
"""After the grace period, how long inference threads get to finish before they are abandoned."""


class Server:
    """A gRPC server over a model repository.

    Args:
        settings: how to run; ``port = 0`` binds a free port (see ``port`` after ``start``).
        role: a lone server (default), or one worker of several on one port (``--workers``:
            ``WorkerRole``), which shares the port, whose metrics go to the supervisor's page,
            and whose model loads and unloads go through the supervisor to every worker.
    """

    def __init__(self, settings: ServerSettings, role: Role | None = None) -> None:
        self.settings = settings
        self.role: Role = role or LoneServer()
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.repository: ModelRepository | None = None
        self.metrics = Metrics(process_metrics=self.role.process_metrics)
        self.observer = Observer(self.metrics, access_log=settings.access_log)
        self.health = Health([SEED_SERVICE, V2_SERVICE])
        self.watchdog = MemoryWatchdog(
            self.health.memory,
            self.metrics,
            interval_s=settings.watchdog_interval_s,
            min_available_bytes=settings.watchdog_min_available_mb * MIB,
            recover_margin_bytes=settings.watchdog_recover_margin_mb * MIB,
            max_rss_bytes=settings.watchdog_max_rss_mb * MIB,
            min_gpu_available_bytes=settings.watchdog_min_gpu_available_mb * MIB,
        )
        self.watcher: RepositoryWatcher | None = None
        self._grpc: grpc.aio.Server | None = None
        self._native: native_front.NativeFront | None = None
        self._fallback_dir: str | None = None
        self.grpc_frontend = "aio"
        """The gRPC front end in use (``native`` or ``aio``), and why when not the one asked."""
        self.grpc_frontend_why = ""
        self._drain: Drain | None = None
        self._http: HttpFrontend | None = None
        denied = self.metrics.denied
        self.access = Access(settings, lambda api, reason: denied.labels(api, reason).inc())
        self.regions = Regions(allowed=settings.allow_client_shm)
        self._metrics_http: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.device_failed = asyncio.Event()
        """Set when a model's device failed for good: the process must stop and start again
        (``serve_until_stopped`` stops it with exit code ``DEVICE_FAILED``)."""

    async def start(self) -> int:
        """Bind, load every model, report SERVING; return the bound port.

        Raises:
            ConfigError: a bad repository, model file or flag, or a port that cannot be bound.
        """
        await self.health.starting()
        self.access.load()  # ConfigError: a token file missing or empty
        self.tls = TlsFiles(self.settings)  # ConfigError: TLS files missing or not a pair
        scanner = await asyncio.to_thread(scanner_for, self.settings)
        repository = ModelRepository(
            scanner,
            self.settings.default_model,
            self.settings.torch_threads,
            self.metrics,
            on_model_change=self.health.model,
            unloaded=self.role.unloaded,
            cores=self.role.cores,
            on_device_failure=self._device_failed,
            offload=self.role.offload,
        )
        self.repository = repository
        self._start_metrics()
        if self.settings.watchdog_interval_s > 0:
            await self.watchdog.check()  # the first reading decides before SERVING is reported
            self._spawn(self.watchdog.run())
        if self.role.serves_while_loading:  # probes get NOT_SERVING while it loads
            await self._serve(repository)
        # Stamps from before the load: a file changed while the models load is picked up.
        baseline = await snapshot(scanner) if self.settings.watch != "off" else None
        try:
            await repository.load()
            if not self.role.serves_while_loading:  # connections only once it can answer
                await self._serve(repository)
        except BaseException:
            await self.stop(grace_s=0)
            raise
        for name in repository.models:
            await self.health.model(name, True)
        # torch and the models leave ~200k long-lived objects that a full garbage collection
        # walks for ~75 ms on the event loop: a P99 spike under load. Freeze them out of it.
        gc.collect()
        gc.freeze()
        await self.health.ready()
        if self.settings.watch != "off":
            self.watcher = RepositoryWatcher(
                repository,
                self.settings.watch,
                self.settings.watch_interval_s,
                self.settings.watch_settle_s,
                baseline,
            )
            self._spawn(self.watcher.run())
        self._log_banner()
        return self.port or 0

    async def _serve(self, repository: ModelRepository) -> None:
        """Take calls: gRPC, and HTTP unless ``--http-port 0``."""
        backend = kserve.Backend(
            repository,
            self.observer,
            self.health,
            self.access,
            self.role.control(repository),
            self.regions,
            self.role.region_control(self.regions),
        )
        native = self.settings.grpc_frontend == "native"
        why = native_front.unavailable_because(self.settings) if native else None
        if native and why is None:
            try:  # the Unix socket of grpc.aio behind it, in a directory of this process's own
                self._fallback_dir = tempfile.mkdtemp(prefix="torchwire-grpc-")
            except OSError as exc:
                why = f"no directory for its fallback socket ({exc}); set TMPDIR"
        if why is not None:
            log.warning("gRPC front end: aio, not native: %s", why)
            self.grpc_frontend_why = why
        if native and why is None:
            await self._serve_native(backend)
        else:
            self._grpc = self._build_grpc(backend, f"{self.settings.host}:{self.settings.port}")
            await self._grpc.start()
        if self.settings.http_port:
            api = HttpApi(backend)
            self._http = HttpFrontend(api, self.settings.max_message_bytes)
            self.http_port = await self._http.start(
                self.settings.host,
                self.settings.http_bind_port(),
                reuse_port=self.role.shares_port,
                ssl_context=self.tls.http_context(),
            )

    async def _serve_native(self, backend: kserve.Backend) -> None:
        """The native front end on the port, grpc.aio behind it on a Unix socket of this
        process's own (a private directory) for every method the front does not serve."""
        assert self._fallback_dir is not None
        fallback = os.path.join(self._fallback_dir, "fallback.sock")
        self._grpc = self._build_grpc(backend, f"unix:{fallback}")
        await self._grpc.start()
        self._native = native_front.NativeFront(
            self.settings,
            backend.plane,
            self.observer,
            self.access,
            self.role.shares_port,
            self.role.cores,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = self._native.start(fallback)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        self.grpc_frontend = "native"

    def _build_grpc(self, backend: kserve.Backend, address: str) -> grpc.aio.Server:
        interceptors = [TokenInterceptor(self.access)] if self.access.tokens is not None else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
                # One process per port unless --workers asks for sharing: a second server on a
                # busy port must fail, not silently split the traffic.
                ("grpc.so_reuseport", int(self.role.shares_port)),
                # Let clients keep connections alive with pings (every 10 s at most).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
                *connection_limits(self.settings),
            ],
        )
        self._drain = Drain(server, interceptors)
        seed = SeedServicer(backend.plane, backend.observer)
        server.add_generic_rpc_handlers((seed.handler(),))
        v2 = V2Servicer(backend)
        server.add_generic_rpc_handlers((v2.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        services = [SEED_SERVICE, V2_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        pool = reflection_pool(
            health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR, service_pb2.DESCRIPTOR
        )
        reflection.enable_server_reflection(services, server, pool=pool)
        try:
            credentials = self.tls.grpc_credentials()
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        return server

    def _start_metrics(self) -> None:
        if not self.settings.metrics_enabled:
            return
        host, port = self.settings.metrics_host, self.settings.metrics_port
        try:
            self._metrics_http = serve_metrics(self.metrics.registry, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        self.metrics_port = self._metrics_http.server_port

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name`` after its queued requests finish; its health goes NOT_SERVING."""
        assert self.repository is not None
        await self.repository.unload(name)

    def _device_failed(self, failure: DeviceFailedError) -> None:
        if not self.device_failed.is_set():
            log.critical("%s: stopping this process to start again with a working device", failure)
            self.device_failed.set()

    def rescan(self) -> None:
        """Look at the model files now (SIGHUP), whatever the watcher last saw."""
        if self.watcher is not None:
            self.watcher.trigger()
        elif self.repository is not None:
            self._spawn(self.repository.reconcile())

    async def stop(self, grace_s: float | None = None) -> bool:
        """Shut down in order; in-flight calls get ``grace_s`` (default: the settings') to end,
        inference threads ``THREAD_STOP_S`` more. Return False if a model call was still running
        then: its thread is abandoned (it cannot be killed) and the process can still exit."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        await self.health.shutting_down()
        delay = self.settings.shutdown_delay_s if grace_s is None else 0.0
        if self._drain is not None:  # no call left waiting in gRPC's core to be cancelled
            await self._drain.open()
        if self._grpc is not None and delay:
            log.info("health NOT_SERVING; refusing new calls in %.1f s", delay)
            await asyncio.sleep(delay)
        if self._grpc is not None:
            assert self._drain is not None
            await self._drain.quiesce()  # closed-loop clients wait for answers, sending nothing
            log.info("shutting down: finishing in-flight requests (grace period %.1f s)", grace)
            stops = [self._grpc.stop(grace)]
            if self._native is not None:
                stops.append(self._native.drain(grace))
            if self._http is not None:
                stops.append(self._http.stop(grace))
            stopping = asyncio.gather(*stops)
            await self._drain.release()  # the held answers, after the GOAWAY
            await stopping
        if self._native is not None:  # its answers are out: GOAWAY, close the port
            await self._native.close()
        if self._fallback_dir is not None:
            shutil.rmtree(self._fallback_dir, ignore_errors=True)
        self.watchdog.stop()
        if self.watcher is not None:
            self.watcher.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        clean = True
        if self.repository is not None:
            clean = await self.repository.close(THREAD_STOP_S)
        self.regions.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        return clean

    def _log_banner(self) -> None:
        assert self.repository is not None
        tls = " over TLS" if self.settings.tls_cert else ""
        front = self.grpc_frontend
        with_threads = ""
        if front == "native" and self._native is not None:
            front += f", {native_front.LIBRARY} {native_front.version()}"
            threads = self._native.io_threads
            with_threads = f" with {threads} I/O thread" + ("s" if threads > 1 else "")
        where = f"{self.settings.host}:{self.port} (gRPC{tls}, {front} front end{with_threads})"
        if self.http_port:
            where += f", {self.settings.host}:{self.http_port} (HTTP{tls})"
        lines = self.role.banner(where)
        if lines is None:
            return
        for name, served in sorted(self.repository.models.items()):
            batcher = served.default()
            model = batcher.model
            default = "  (default)" if name == self.repository.default_model else ""
            inline = f"  inline<={batcher.inline_items}" if batcher.inline_items else ""
            host = f" in the {batcher.host}" if batcher.host else ""
            lines.append(
                f"  {name} v{sorted(served.versions)} on {model.device}{host}: {model.signature()}"
                f"  batch<={batcher.max_batch_size}  threads {batcher.instances}x"
                f"{batcher.intra_op_threads}{inline}{default}"
            )
        lines.append(
            "  APIs: /ModelService/Predict, /ModelService/PredictStream, "
            "inference.GRPCInferenceService (KServe V2), health, reflection"
        )
        if self.metrics_port is not None:
            lines.append(
                f"  metrics: http://{self.settings.metrics_host}:{self.metrics_port}/metrics"
            )
        log.info("\n".join(lines))
