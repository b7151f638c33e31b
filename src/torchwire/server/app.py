"""One torchwire server process: start-up, serving and shutdown, each its own method.

Start-up binds the port first with health NOT_SERVING (so probes get an answer while models load),
loads every model, then turns health SERVING. Shutdown runs in order: health NOT_SERVING, stop
accepting calls, let in-flight calls finish within the grace period, cancel the rest, then stop the
batchers and their inference threads.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from torchwire._proto import modelservice_pb2_grpc
from torchwire.config import ServerSettings
from torchwire.errors import ConfigError
from torchwire.repository import (
    ModelRepository,
    ModelSource,
    ensure_demo_repository,
    model_file_source,
    scan_repository,
)
from torchwire.server.seed import SeedServicer

log = logging.getLogger(__name__)

SEED_SERVICE = "ModelService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_sources(settings: ServerSettings) -> list[ModelSource]:
    """What to serve: ``--repository``, else ``--model``, else the built-in demo repository."""
    if settings.workers != 1:
        raise ConfigError("--workers other than 1 is not implemented yet")
    if settings.repository and settings.model:
        raise ConfigError("give --repository or --model, not both")
    if settings.model:
        return [model_file_source(settings.model, settings.input_shape)]
    root = settings.repository or ensure_demo_repository(settings.cache_dir)
    return scan_repository(Path(root))


class Server:
    """A gRPC server over a model repository.

    Args:
        settings: how to run; ``port = 0`` binds a free port (see ``port`` after ``start``).
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self.repository: ModelRepository | None = None
        self.health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Bind, load every model, report SERVING; return the bound port.

        Raises:
            ConfigError: a bad repository, model file or flag, or a port that cannot be bound.
        """
        await self.health.set("", NOT_SERVING)
        await self.health.set(SEED_SERVICE, NOT_SERVING)
        sources = await asyncio.to_thread(model_sources, self.settings)
        repository = ModelRepository(
            sources, self.settings.default_model, self.settings.torch_threads
        )
        self.repository = repository
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.settings.max_message_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
                # One process per port unless --workers asks for sharing: a second server on a
                # busy port must fail, not silently split the traffic.
                ("grpc.so_reuseport", 0),
            ]
        )
        modelservice_pb2_grpc.add_ModelServiceServicer_to_server(  # type: ignore[no-untyped-call]
            SeedServicer(repository), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        self._grpc = server
        await server.start()
        try:
            await repository.load()
        except BaseException:
            await self.stop(grace_s=0)
            raise
        await self.health.set(SEED_SERVICE, SERVING)
        await self.health.set("", SERVING)
        self._log_banner(address)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Shut down in order; in-flight calls get ``grace_s`` (default: the settings') to end."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None and grace_s is None and self.settings.shutdown_delay_s:
            log.info(
                "health NOT_SERVING; refusing new calls in %.1f s", self.settings.shutdown_delay_s
            )
            await asyncio.sleep(self.settings.shutdown_delay_s)
        if self._grpc is not None:
            log.info("shutting down: finishing in-flight requests (grace period %.1f s)", grace)
            await self._grpc.stop(grace)
        if self.repository is not None:
            await self.repository.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait until ``stop`` has finished."""
        await self._stopped.wait()

    def _log_banner(self, address: str) -> None:
        assert self.repository is not None
        lines = [f"torchwire serving on {self.settings.host}:{self.port} (gRPC)"]
        for name, served in sorted(self.repository.models.items()):
            batcher = served.versions[served.default_version]
            model = batcher.model
            default = "  (default)" if name == self.repository.default_model else ""
            sig_in = ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in model.inputs)
            sig_out = ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in model.outputs)
            lines.append(
                f"  {name} v{sorted(served.versions)} on {model.device}: {sig_in} -> {sig_out}"
                f"  batch<={batcher.max_batch_size}{default}"
            )
        lines.append(
            f"  seed API /ModelService/Predict, /ModelService/PredictStream; address {address}"
        )
        log.info("\n".join(lines))
