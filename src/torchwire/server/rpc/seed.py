"""The founding document's ``ModelService``: ``Predict`` and ``PredictStream``.

Protocol adapter only: decode to arrays, ask the repository for the model version, await its
batcher, encode. ``PredictStream`` reads ahead: every request is queued as soon as it arrives (so a
stream's requests share batches with each other and with everyone else's), and the answers go back
one per request, in request order, each as soon as it and those before it are done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import grpc

from torchwire.errors import TorchwireError
from torchwire.runtime.model import Arrays
from torchwire.server.common.observe import Call, Observer
from torchwire.server.common.status import abort_with, stream_errors, unary_errors
from torchwire.server.plane.inference import DataPlane, SeedInference

# How many requests of one stream may be queued or computing before the stream stops reading:
# flow control, so one fast writer cannot fill the model's queue alone.
STREAM_WINDOW = 128
SEED_SERVICE = "ModelService"


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` instant, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@dataclass(slots=True)
class _Queued:
    index: int
    inference: SeedInference
    answer: asyncio.Future[Arrays]


@dataclass(slots=True)
class _Failed:
    index: int
    call: Call
    error: Exception


class SeedServicer:
    """``/ModelService/Predict`` and ``/ModelService/PredictStream`` over a repository.

    Its handlers take and return serialized bytes (``seed_wire`` reads and writes them): see
    ``handler`` for how they are registered.
    """

    def __init__(self, plane: DataPlane, observer: Observer) -> None:
        self._plane = plane
        self._observer = observer

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving both methods at ``/ModelService/...`` with raw bytes."""
        return grpc.method_handlers_generic_handler(
            SEED_SERVICE,
            {
                "Predict": grpc.unary_unary_rpc_method_handler(self.Predict),
                "PredictStream": grpc.stream_stream_rpc_method_handler(self.PredictStream),
            },
        )

    @unary_errors
    async def Predict(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with self._observer.call("seed", context) as call:
            inference = self._plane.seed(data, call, call_deadline(context))
            return inference.encode(await inference.submit())

    @stream_errors
    async def PredictStream(
        self, requests: AsyncIterable[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        pending: asyncio.Queue[_Queued | _Failed | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(requests, context, pending))
        entry: _Queued | _Failed | None = None
        try:
            while (entry := await pending.get()) is not None:
                prefix = f"request {entry.index} of the stream: "
                if isinstance(entry, _Failed):
                    entry.call.finish(entry.error)
                    await abort_with(context, entry.error, prefix)
                inference = entry.inference
                try:
                    response = inference.encode(await entry.answer)
                except TorchwireError as exc:
                    inference.call.finish(exc)
                    await abort_with(context, exc, prefix)
                inference.call.finish()
                yield response
        finally:
            reader.cancel()
            # Whatever was not answered (the caller went away, or an error ended the stream)
            # is counted as cancelled, and dropped from its batch.
            abandoned: list[_Queued | _Failed | None] = [entry]
            while not pending.empty():
                abandoned.append(pending.get_nowait())
            for left in abandoned:
                if isinstance(left, _Failed):
                    left.call.finish(asyncio.CancelledError())
                elif left is not None:
                    left.inference.call.finish(asyncio.CancelledError())
                    left.answer.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterable[bytes],
        context: grpc.aio.ServicerContext,
        pending: asyncio.Queue[_Queued | _Failed | None],
    ) -> None:
        """Queue each request as it arrives; end with None, or with the first failure."""
        deadline = call_deadline(context)
        index = 0
        try:
            async for data in requests:
                call = self._observer.call("seed_stream", context)
                try:
                    inference = self._plane.seed(data, call, deadline)
                    answer = inference.submit()
                except TorchwireError as exc:
                    await pending.put(_Failed(index, call, exc))
                    return
                try:
                    await pending.put(_Queued(index, inference, answer))
                except asyncio.CancelledError:  # the stream ended while the window was full
                    call.finish(asyncio.CancelledError())
                    answer.cancel()
                    raise
                index += 1
        except Exception as exc:  # the request stream itself broke
            await pending.put(_Failed(index, self._observer.call("seed_stream", context), exc))
            return
        await pending.put(None)
