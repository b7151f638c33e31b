"""Where torchwire's exceptions become gRPC statuses (the table is ``errors.STATUS_NAMES``).

Handlers raise ``torchwire.errors`` exceptions; ``unary_errors`` and ``stream_errors`` turn them
into ``context.abort(code, message)``. Anything else is a bug: it is logged with its traceback and
sent as INTERNAL with a generic message and an error id (``errors.report_bug``), never
``str(exc)``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from torchwire import errors

log = logging.getLogger(__name__)


Request = TypeVar("Request")
Response = TypeVar("Response")
UnaryHandler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]
StreamHandler = Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[Response]]


def status_code(exc: errors.TorchwireError) -> grpc.StatusCode:
    """The status code a torchwire exception travels as (``errors.STATUS_NAMES``)."""
    code: grpc.StatusCode = grpc.StatusCode[exc.code]
    return code


async def abort_with(
    context: grpc.aio.ServicerContext, exc: BaseException, prefix: str = ""
) -> NoReturn:
    """End the call with the status that ``exc`` maps to. Past the call's deadline gRPC has
    ended it already (the caller got DEADLINE_EXCEEDED): sending a status then fails, and gRPC
    logs that failure as an error with a traceback, so the handler just stops."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise asyncio.CancelledError
    if isinstance(exc, errors.TorchwireError):
        if exc.metadata:
            context.set_trailing_metadata(tuple(exc.metadata.items()))
        await context.abort(status_code(exc), prefix + str(exc))
    bug = errors.report_bug(log, "unexpected error in a handler", exc)
    await context.abort(grpc.StatusCode.INTERNAL, prefix + str(bug))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def unary_errors(
    handler: UnaryHandler[Request, Response],
) -> UnaryHandler[Request, Response]:
    """Map exceptions of a unary handler to gRPC statuses."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return wrapper


def stream_errors(handler: StreamHandler[Response]) -> StreamHandler[Response]:
    """Map exceptions of a streaming handler to gRPC statuses."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, requests: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        try:
            async for response in handler(self, requests, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return wrapper
