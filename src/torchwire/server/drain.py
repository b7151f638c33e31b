"""Stopping a gRPC server without answering calls CANCELLED.

When grpc.aio stops a server, gRPC's core first kills every call it has accepted but the Python
server has not yet asked for, and only then sends the clients GOAWAY. grpc.aio asks for one call
at a time, so under load a few calls always wait in the core, and their callers get CANCELLED,
which no client retries (3 to 11 of them per stop under 16 closed-loop callers here). ``Drain``
asks the core for many calls at once as the server starts to stop: a call that arrives is then
handed to Python at once and served like any other, and the core has nothing left to kill. A
client that sends a call after the GOAWAY gets UNAVAILABLE from its own transport (retried).

What is left is a race no server can close from Python: a call that a client sends in the instant
between the core's shutdown and the client reading the GOAWAY is still cancelled (1 call in 5
stops under the same load).

This reaches into grpc's private Cython layer for the three names grpc.aio's own accept loop uses
(``AioServer._request_call``, ``_handle_rpc``, ``_schedule_rpc_coro``). grpcio is pinned
(constraints.txt); where those names are missing, stopping works as before, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from grpc._cython import cygrpc

log = logging.getLogger(__name__)

WIDTH = 256
"""Calls asked of the core at once while stopping: more than can arrive in one turn of the
event loop."""


class Drain:
    """Asks gRPC's core for calls ``WIDTH`` at a time once ``open``; from construction on, it
    records the generic handlers added to ``server``, to serve those calls with them."""

    def __init__(self, server: grpc.aio.Server, interceptors: Sequence[Any]) -> None:
        self._server = server
        self._interceptors = tuple(interceptors)
        self._handlers: list[grpc.GenericRpcHandler] = []
        self._tasks: set[asyncio.Task[None]] = set()
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
        for _ in range(WIDTH):
            task = loop.create_task(self._accept(core, loop))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)  # each task asks for its first call in its first step

    async def _accept(self, core: Any, loop: asyncio.AbstractEventLoop) -> None:
        handlers, interceptors = list(self._handlers), self._interceptors
        while True:
            try:
                rpc_state = await core._request_call()
            except Exception:  # the core has stopped: it fails the calls still asked for
                return
            # What grpc.aio's accept loop does with a call (no concurrency limit is set here).
            coroutine = cygrpc._handle_rpc(handlers, interceptors, rpc_state, loop, False)
            loop.create_task(cygrpc._schedule_rpc_coro(coroutine, rpc_state, loop))
