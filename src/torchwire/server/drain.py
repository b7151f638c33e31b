"""Stopping a gRPC server without answering calls CANCELLED.

When grpc.aio stops a server, gRPC's core first kills every call it has accepted but the Python
server has not yet asked for, and only then sends the clients GOAWAY. grpc.aio asks for one call
at a time, so under load a few calls always wait in the core, and their callers get CANCELLED,
which no client retries (3 to 11 of them per stop under 16 closed-loop callers here). ``Drain``
asks the core for many calls at once as the server starts to stop: a call that arrives is then
handed to Python at once and served like any other, and the core has nothing left to kill. A
client that sends a call after the GOAWAY gets UNAVAILABLE from its own transport (retried).

That leaves the calls a client sends between the core's shutdown and its reading the GOAWAY:
still cancelled (0 to 7 per stop under the same load). ``quiesce`` closes that window for
clients that wait for an answer before they send again (closed loop, the usual case): just before
the shutdown it holds the answers of unary calls until no new call has come for ``QUIET_S`` (at
most ``HOLD_MAX_S``, and never past a call's deadline). Those clients then have nothing in
flight when the core shuts down, and get their answers right after the GOAWAY (``release``):
0 CANCELLED in 9 stops under 16 closed-loop callers. A client that sends without waiting for
answers (open loop) can still lose a call to that window.

This reaches into grpc's private Cython layer for the three names grpc.aio's own accept loop uses
(``AioServer._request_call``, ``_handle_rpc``, ``_schedule_rpc_coro``). grpcio is pinned
(constraints.txt); where those names are missing, stopping works as before, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc._cython import cygrpc

log = logging.getLogger(__name__)

WIDTH = 256
"""Calls asked of the core at once while stopping: more than can arrive in one turn of the
event loop."""
QUIET_S = 0.02
"""No new call for this long: the clients are waiting for their answers (a closed-loop client
sends its next call well within it of getting an answer, on this 2-core machine under load)."""
HOLD_MAX_S = 0.2
"""Answers are held at most this long (clients that send without waiting never go quiet)."""
HOLD_MARGIN_S = 0.005
"""A held answer leaves at least this long before its call's deadline."""


class Drain:
    """Asks gRPC's core for calls ``WIDTH`` at a time once ``open``; from construction on, it
    records the generic handlers added to ``server``, to serve those calls with them."""

    def __init__(self, server: grpc.aio.Server, interceptors: Sequence[Any]) -> None:
        self._server = server
        self._interceptors = tuple(interceptors)
        self._handlers: list[grpc.GenericRpcHandler] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrivals = 0  # calls taken while stopping
        self._gate: asyncio.Event | None = None  # set: answers leave; clear: they are held
        add = server.add_generic_rpc_handlers

        def recording(handlers: Sequence[grpc.GenericRpcHandler]) -> None:
            self._handlers.extend(handlers)
            add(handlers)

        # Health and reflection add theirs through the server: record every handler there.
        server.add_generic_rpc_handlers = recording

    def _supported(self) -> bool:
        core = getattr(self._server, "_server", None)
        return all(
            hasattr(owner, name)
            for owner, name in (
                (core, "_request_call"),
                (core, "is_running"),
                (cygrpc, "_handle_rpc"),
                (cygrpc, "_schedule_rpc_coro"),
            )
        )

    async def open(self) -> None:
        """Ask for ``WIDTH`` calls, and go on asking until the server has stopped; return once
        every one has been asked for (call it before ``grpc.aio.Server.stop``)."""
        if not self._supported():
            log.warning(
                "grpc.aio's accept loop is not what torchwire knows (grpcio %s): calls waiting "
                "in gRPC when the server stops will be answered CANCELLED",
                grpc.__version__,
            )
            return
        core: Any = getattr(self._server, "_server")  # noqa: B009  (private: cygrpc.AioServer)
        if not core.is_running():  # never started (it failed to), or stopping already
            return
        loop = asyncio.get_running_loop()
        self._gate = asyncio.Event()
        self._gate.set()
        handlers = [self._holding(handler) for handler in self._handlers]
        for _ in range(WIDTH):
            task = loop.create_task(self._accept(core, handlers, loop))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)  # each task asks for its first call in its first step

    async def quiesce(self) -> None:
        """Hold the answers of unary calls from now until ``release``; return once no call has
        come for ``QUIET_S``, or after ``HOLD_MAX_S``."""
        if self._gate is None:
            return
        self._gate.clear()
        started = quiet_since = time.monotonic()
        seen = self._arrivals
        while (now := time.monotonic()) - started < HOLD_MAX_S:
            if self._arrivals != seen:
                seen, quiet_since = self._arrivals, now
            elif now - quiet_since >= QUIET_S:
                return
            await asyncio.sleep(0.002)
        log.info("clients still sending after %.0f ms of held answers", HOLD_MAX_S * 1e3)

    async def release(self) -> None:
        """Let held answers go, once the core has shut down (and sent its GOAWAY): call it
        right after starting ``grpc.aio.Server.stop``."""
        if self._gate is None:
            return
        core: Any = getattr(self._server, "_server")  # noqa: B009
        for _ in range(100):  # grpc.aio's stop shuts the core down in its first step
            if not core.is_running():
                break
            await asyncio.sleep(0)
        self._gate.set()

    async def _hold(self, context: grpc.aio.ServicerContext) -> None:
        gate = self._gate
        if gate is None or gate.is_set():
            return
        remaining = context.time_remaining()
        wait = HOLD_MAX_S if remaining is None else min(HOLD_MAX_S, remaining - HOLD_MARGIN_S)
        if wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(gate.wait(), wait)

    def _holding(self, handler: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
        """``handler``, counting the calls it takes, its unary answers held by ``_hold``."""
        drain = self

        class Holding(grpc.GenericRpcHandler):  # type: ignore[misc]
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                drain._arrivals += 1
                method = handler.service(details)
                if method is None or not method.unary_unary:
                    return method
                behavior: Callable[[Any, Any], Awaitable[Any]] = method.unary_unary

                async def held(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    try:
                        return await behavior(request, context)
                    finally:
                        await drain._hold(context)

                return grpc.unary_unary_rpc_method_handler(
                    held,
                    request_deserializer=method.request_deserializer,
                    response_serializer=method.response_serializer,
                )

        return Holding()

    async def _accept(
        self, core: Any, handlers: list[grpc.GenericRpcHandler], loop: asyncio.AbstractEventLoop
    ) -> None:
        while True:
            try:
                rpc_state = await core._request_call()
            except Exception:  # the core has stopped: it fails the calls still asked for
                return
            # What grpc.aio's accept loop does with a call (no concurrency limit is set here).
            coroutine = cygrpc._handle_rpc(handlers, self._interceptors, rpc_state, loop, False)
            loop.create_task(cygrpc._schedule_rpc_coro(coroutine, rpc_state, loop))
