"""Stopping a gRPC server without answering calls CANCELLED.

When grpc.aio stops a server, gRPC's core first kills every call it has accepted but the Python
server has not yet asked for, and only then sends the clients GOAWAY. grpc.aio asks for one call
at a time, so under load a few calls always wait in the core, and their callers get CANCELLED,
which no client retries (figures: docs/design-notes.md, "Stopping grpc.aio"). ``Drain``
asks the core for many calls at once as the server starts to stop: a call that arrives is then
handed to Python at once and served like any other, and the core has nothing left to kill. A
client that sends a call after the GOAWAY gets UNAVAILABLE from its own transport (retried).

That leaves the calls a client sends between the core's shutdown and its reading the GOAWAY:
still cancelled. ``quiesce`` closes that window for
clients that wait for an answer before they send again (closed loop, the usual case): just before
the shutdown it holds the answers of unary calls until no new call has come for ``QUIET_S`` (at
most ``HOLD_MAX_S``, and never past a call's deadline). Those clients then have nothing in
flight when the core shuts down, and get their answers right after the GOAWAY (``release``).
Every unary answer that leaves during the
quiesce is held, errors included (``context.abort`` sends its status at once, so it is held
before it sends). A client that sends without waiting for answers (open loop) can still lose a
call to that window.

Asking the core for calls uses grpc.aio's private accept loop (``compat.grpc_aio``). Where this
grpcio's differs from the one that module knows, nothing is wrapped or asked for, and stopping
works as grpc.aio does by itself, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc

from torchwire.compat import grpc_aio

log = logging.getLogger(__name__)

WIDTH = 256
"""Calls asked of the core at once while stopping: more than can arrive in one turn of the
event loop."""
QUIET_S = 0.02
"""No new call for this long: the clients are waiting for their answers (a closed-loop client
sends its next call well within it of getting one)."""
HOLD_MAX_S = 0.2
"""Answers are held at most this long (clients that send without waiting never go quiet)."""
HOLD_MARGIN_S = 0.02
"""A held answer leaves at least this long before its call's deadline."""


class Drain:
    """Wraps every generic handler added to ``server`` from construction on (answers can be
    held); ``open`` asks gRPC's core for calls ``WIDTH`` at a time until the server stops."""

    def __init__(self, server: grpc.aio.Server, interceptors: Sequence[Any]) -> None:
        self._core: Any = grpc_aio.accept_loop(server)  # None: not the loop compat knows
        self._interceptors = tuple(interceptors)
        self._handlers: list[grpc.GenericRpcHandler] = []
        self._tasks: set[asyncio.Task[Any]] = set()  # the accept tasks and the calls they took
        self._arrivals = 0  # calls that reached a handler
        self._gate: asyncio.Event | None = None  # once open: set, answers leave; clear, held
        self._known = self._core is not None
        if not self._known:
            return
        add = server.add_generic_rpc_handlers

        def wrapping(handlers: Sequence[grpc.GenericRpcHandler]) -> None:
            held = [_Holding(self, handler) for handler in handlers]
            self._handlers.extend(held)
            add(held)

        # Health and reflection add theirs through the server: this wraps every handler there.
        server.add_generic_rpc_handlers = wrapping

    async def open(self) -> None:
        """Ask for ``WIDTH`` calls, and go on asking until the server has stopped; return once
        every one has been asked for (call it before ``grpc.aio.Server.stop``)."""
        if not self._known:
            log.warning(
                "grpc.aio's accept loop is not the one torchwire knows (grpcio %s): calls "
                "waiting in gRPC when the server stops will be answered CANCELLED",
                grpc.__version__,
            )
            return
        if self._gate is not None or not self._core.is_running():  # open already; or never started
            return
        loop = asyncio.get_running_loop()
        self._gate = asyncio.Event()
        self._gate.set()
        for _ in range(WIDTH):
            self._spawn(loop, self._accept(loop))
        await asyncio.sleep(0)  # each task asks for its first call in its first step

    async def quiesce(self) -> None:
        """Hold unary answers from now until ``release``; return once no call has come for
        ``QUIET_S``, or after ``HOLD_MAX_S``."""
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
        for _ in range(100):  # grpc.aio's stop shuts the core down in its first step
            if not self._core.is_running():
                break
            await asyncio.sleep(0)
        self._gate.set()

    async def hold(self, context: grpc.aio.ServicerContext) -> None:
        """Wait while answers are held: at most ``HOLD_MAX_S``, and not into the last
        ``HOLD_MARGIN_S`` of the call's deadline; not at all for a call the client cancelled."""
        gate = self._gate
        if gate is None or gate.is_set() or context.cancelled():
            return
        remaining = context.time_remaining()
        wait = HOLD_MAX_S if remaining is None else min(HOLD_MAX_S, remaining - HOLD_MARGIN_S)
        if wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(gate.wait(), wait)

    @property
    def holding(self) -> bool:
        """Whether answers may be held now (the server is stopping)."""
        return self._gate is not None

    def _spawn(self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, loop: asyncio.AbstractEventLoop) -> None:
        core, handlers, interceptors = self._core, self._handlers, self._interceptors
        while True:
            try:
                rpc_state = await grpc_aio.request_call(core)
            except Exception:  # the core has stopped: it fails the calls still asked for
                return
            self._spawn(loop, grpc_aio.serve(handlers, interceptors, rpc_state, loop))


class _Holding(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose unary answers, errors included, wait while the drain holds
    them; it counts the calls it takes. Other kinds of call are left as they are."""

    def __init__(self, drain: Drain, handler: grpc.GenericRpcHandler) -> None:
        self._drain = drain
        self._handler = handler
        self._held: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = self._handler.service(details)
        if method is None:  # another handler's method
            return None
        self._drain._arrivals += 1
        behavior = method.unary_unary
        if behavior is None or not inspect.iscoroutinefunction(behavior):
            return method
        known = self._held.get(details.method)  # one wrapper per method, made once
        if known is None or known[0] is not method:
            known = self._held[details.method] = (method, self._wrap(method, behavior))
        return known[1]

    def _wrap(
        self, method: grpc.RpcMethodHandler, behavior: Callable[[Any, Any], Awaitable[Any]]
    ) -> grpc.RpcMethodHandler:
        drain = self._drain

        async def held(request: Any, context: grpc.aio.ServicerContext) -> Any:
            given = _HeldAbort(context, drain) if drain.holding else context
            try:
                return await behavior(request, given)
            finally:
                if drain.holding:  # the server is stopping
                    await drain.hold(context)

        return grpc.unary_unary_rpc_method_handler(
            held,
            request_deserializer=method.request_deserializer,
            response_serializer=method.response_serializer,
        )


class _HeldAbort:
    """A servicer context whose ``abort`` waits while the drain holds answers: grpc.aio sends
    the error status inside ``abort``, before its exception leaves the handler."""

    def __init__(self, context: grpc.aio.ServicerContext, drain: Drain) -> None:
        self._context = context
        self._drain = drain

    async def abort(self, *args: Any, **kwargs: Any) -> Any:
        await self._drain.hold(self._context)
        return await self._context.abort(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
