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
from torchwire.repository import ModelRepository
from torchwire.runtime import Batcher
from torchwire.runtime.model import Arrays
from torchwire.server.observe import Call, Observer
from torchwire.server.seed_codec import decode_request, encode_response
from torchwire.server.seed_wire import SeedRequest, parse_request
from torchwire.server.status import abort_with, stream_errors, unary_errors

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
    call: Call
    answer: asyncio.Future[Arrays]
    raw: bool


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

    def __init__(self, repository: ModelRepository, observer: Observer) -> None:
        self._repository = repository
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

    def _prepare(self, request: SeedRequest, call: Call) -> tuple[Batcher, Arrays, int]:
        """Pick the model version and decode the request for it (raises on bad input)."""
        metadata = request.metadata
        batcher = self._repository.get(metadata.get("model"), metadata.get("version"))
        call.target(batcher)
        arrays, call.items = decode_request(request, batcher.model)
        return batcher, arrays, call.items

    @unary_errors
    async def Predict(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with self._observer.call("seed", context) as call:
            request = parse_request(data)
            batcher, arrays, items = self._prepare(request, call)
            outputs = await batcher.submit(arrays, items, call_deadline(context))
            elapsed = time.perf_counter() - call.started
            return encode_response(outputs, bool(request.raw), elapsed)

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
                try:
                    outputs = await entry.answer
                    elapsed = time.perf_counter() - entry.call.started
                    response = encode_response(outputs, entry.raw, elapsed)
                except TorchwireError as exc:
                    entry.call.finish(exc)
                    await abort_with(context, exc, prefix)
                entry.call.finish()
                yield response
        finally:
            reader.cancel()
            # Whatever was not answered (the caller went away, or an error ended the stream)
            # is counted as cancelled, and dropped from its batch.
            abandoned: list[_Queued | _Failed | None] = [entry]
            while not pending.empty():
                abandoned.append(pending.get_nowait())
            for left in abandoned:
                if left is not None:
                    left.call.finish(asyncio.CancelledError())
                    if isinstance(left, _Queued):
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
                    request = parse_request(data)
                    batcher, arrays, items = self._prepare(request, call)
                    answer = batcher.submit(arrays, items, deadline)
                except TorchwireError as exc:
                    await pending.put(_Failed(index, call, exc))
                    return
                queued = _Queued(index, call, answer, bool(request.raw))
                try:
                    await pending.put(queued)
                except asyncio.CancelledError:  # the stream ended while the window was full
                    call.finish(asyncio.CancelledError())
                    answer.cancel()
                    raise
                index += 1
        except Exception as exc:  # the request stream itself broke
            await pending.put(_Failed(index, self._observer.call("seed_stream", context), exc))
            return
        await pending.put(None)
