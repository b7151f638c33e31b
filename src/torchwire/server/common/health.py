"""``grpc.health.v1.Health`` (Check and Watch) and the rule that sets the overall status.

grpc's own asyncio servicer forgets a service's watchers when any one of them leaves, so a
second watcher (two load balancers, a probe and a dashboard) stops getting updates; this one keeps
a change counter per service that every watcher waits on.

Statuses: ``""`` is SERVING only after start-up, before shutdown and while the memory watchdog is
content; the API services (``ModelService``, ...) are SERVING once the models are loaded; each
model name is SERVING while a version of it is loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Serves the statuses; ``Health`` below decides them."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        # Watchers of a name nobody set wait here: no state per name a client makes up.
        self._appeared = asyncio.Condition()

    def status(self, service: str) -> int | None:
        return self._status.get(service)

    def services(self) -> list[str]:
        return list(self._status)

    def state_size(self) -> int:
        """Services with state kept: those set, never names that clients merely asked about."""
        return len(self._changed)

    async def set(self, service: str, status: int) -> None:
        condition = self._changed.get(service)
        if condition is None:
            self._status[service] = status
            self._changed[service] = asyncio.Condition()
            async with self._appeared:
                self._appeared.notify_all()
            return
        async with condition:
            if self._status.get(service) != status:
                self._status[service] = status
                condition.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = None
        while True:
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            condition = self._changed.get(request.service, self._appeared)
            async with condition:
                if self._status.get(request.service, SERVICE_UNKNOWN) == last:
                    await condition.wait()


class Health:
    """Decides every status from the server's state: starting, ready, memory, engines, shutting
    down."""

    def __init__(self, services: list[str]) -> None:
        self.servicer = HealthServicer()
        self._services = services
        self._ready = False
        self._memory_ok = True
        self._engines_ok = True
        self._shutting_down = False

    @property
    def ready_to_serve(self) -> bool:
        """What V2 ServerReady reports: the same as the overall status."""
        return self.overall == SERVING

    @property
    def overall(self) -> int:
        ok = self._ready and self._memory_ok and self._engines_ok and not self._shutting_down
        return SERVING if ok else NOT_SERVING

    async def _update(self) -> None:
        await self.servicer.set("", self.overall)
        api = SERVING if self._ready and not self._shutting_down else NOT_SERVING
        for service in self._services:
            await self.servicer.set(service, api)

    async def starting(self) -> None:
        await self._update()

    async def ready(self) -> None:
        self._ready = True
        await self._update()

    async def memory(self, ok: bool) -> None:
        self._memory_ok = ok
        await self._update()

    async def engines(self, ok: bool) -> None:
        """Every engine this worker's models are held by answers (``--engine``): while one
        restarts, its models cannot, and a load balancer should send calls elsewhere."""
        self._engines_ok = ok
        await self._update()

    async def model(self, name: str, loaded: bool) -> None:
        """A model became served (``loaded``) or stopped being served."""
        serving = loaded and not self._shutting_down
        await self.servicer.set(name, SERVING if serving else NOT_SERVING)

    async def shutting_down(self) -> None:
        self._shutting_down = True
        await self._update()
        for service in self.servicer.services():
            await self.servicer.set(service, NOT_SERVING)
