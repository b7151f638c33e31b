"""grpc.aio's private accept loop, as grpcio 1.81 has it (``server/rpc/drain.py`` asks the core for
many calls at once while the server stops, so that none is left to be cancelled).

grpcio 1.85 changed ``_handle_rpc`` (``method_name, method_resolver, ...``) and
``_schedule_rpc_coro`` (a ``method_name`` more): ``accept_loop`` then answers None, and stopping
works as grpc.aio does by itself (``pyproject.toml`` keeps grpcio below 1.82 for that reason).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from grpc._cython import cygrpc

HANDLE_RPC = ("generic_handlers", "interceptors", "rpc_state", "loop", "concurrency_exceeded")
SCHEDULE_RPC_CORO = ("rpc_coro", "rpc_state", "loop")


def known() -> bool:
    """Whether this grpcio's accept loop takes what this module passes (grpcio 1.81's)."""
    try:
        handle = tuple(inspect.signature(cygrpc._handle_rpc).parameters)
        schedule = tuple(inspect.signature(cygrpc._schedule_rpc_coro).parameters)
    except (AttributeError, TypeError, ValueError):
        return False
    return handle == HANDLE_RPC and schedule == SCHEDULE_RPC_CORO


def accept_loop(server: grpc.aio.Server) -> Any | None:
    """The server's core (``cygrpc.AioServer``) if its accept loop is the one this module knows,
    else None."""
    core = getattr(server, "_server", None)
    if not (hasattr(core, "_request_call") and hasattr(core, "is_running")) or not known():
        return None
    return core


async def request_call(core: Any) -> Any:
    """The next call the core accepts (its ``rpc_state``); raises once the core has stopped."""
    return await core._request_call()


def serve(
    handlers: Sequence[grpc.GenericRpcHandler],
    interceptors: Sequence[Any],
    rpc_state: Any,
    loop: asyncio.AbstractEventLoop,
) -> Coroutine[Any, Any, Any]:
    """What grpc.aio's accept loop does with an accepted call (no concurrency limit): the
    coroutine that serves it, to be run as a task."""
    coroutine = cygrpc._handle_rpc(list(handlers), tuple(interceptors), rpc_state, loop, False)
    return cygrpc._schedule_rpc_coro(coroutine, rpc_state, loop)  # type: ignore[no-any-return]


def channelz_servers() -> str:
    """gRPC core's servers in this process as channelz JSON (their call counters): what the
    stop tests count calls by (the grpcio-channelz service exposes the same over gRPC)."""
    found = cygrpc.channelz_get_servers(0)
    return found.decode() if isinstance(found, bytes) else str(found)
