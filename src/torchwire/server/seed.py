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

from torchwire._proto import modelservice_pb2_grpc
from torchwire._proto.modelservice_messages_pb2 import PredictRequest, PredictResponse
from torchwire.errors import TorchwireError
from torchwire.repository import ModelRepository
from torchwire.runtime import Batcher
from torchwire.runtime.model import Arrays
from torchwire.server.seed_codec import decode_request, encode_response
from torchwire.server.status import abort_with, stream_errors, unary_errors

# How many requests of one stream may be queued or computing before the stream stops reading:
# flow control, so one fast writer cannot fill the model's queue alone.
STREAM_WINDOW = 128


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` instant, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


@dataclass(slots=True)
class _Queued:
    index: int
    started: float
    answer: asyncio.Future[Arrays]
    raw: bool


@dataclass(slots=True)
class _Failed:
    index: int
    error: Exception


class SeedServicer(modelservice_pb2_grpc.ModelServiceServicer):
    """``/ModelService/Predict`` and ``/ModelService/PredictStream`` over a repository."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    def _prepare(self, request: PredictRequest) -> tuple[Batcher, Arrays, int]:
        """Pick the model version and decode the request for it (raises on bad input)."""
        metadata = request.metadata
        batcher = self._repository.get(metadata.get("model"), metadata.get("version"))
        arrays, items = decode_request(request, batcher.model)
        return batcher, arrays, items

    @unary_errors
    async def Predict(
        self, request: PredictRequest, context: grpc.aio.ServicerContext
    ) -> PredictResponse:
        started = time.perf_counter()
        batcher, arrays, items = self._prepare(request)
        outputs = await batcher.infer(arrays, items, call_deadline(context))
        return encode_response(outputs, bool(request.raw_inputs), time.perf_counter() - started)

    @stream_errors
    async def PredictStream(
        self, requests: AsyncIterable[PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[PredictResponse]:
        pending: asyncio.Queue[_Queued | _Failed | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
        reader = asyncio.create_task(self._read_stream(requests, call_deadline(context), pending))
        try:
            while (entry := await pending.get()) is not None:
                if isinstance(entry, _Failed):
                    await abort_with(context, entry.error, f"request {entry.index} of the stream: ")
                try:
                    outputs = await entry.answer
                except TorchwireError as exc:
                    await abort_with(context, exc, f"request {entry.index} of the stream: ")
                yield encode_response(outputs, entry.raw, time.perf_counter() - entry.started)
        finally:
            reader.cancel()
            while not pending.empty():  # abandon what nobody will read: the batcher skips it
                entry = pending.get_nowait()
                if isinstance(entry, _Queued):
                    entry.answer.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterable[PredictRequest],
        deadline: float | None,
        pending: asyncio.Queue[_Queued | _Failed | None],
    ) -> None:
        """Queue each request as it arrives; end with None, or with the first failure."""
        index = 0
        try:
            async for request in requests:
                started = time.perf_counter()
                batcher, arrays, items = self._prepare(request)
                answer = asyncio.ensure_future(batcher.infer(arrays, items, deadline))
                await pending.put(_Queued(index, started, answer, bool(request.raw_inputs)))
                index += 1
        except Exception as exc:  # bad input, or the request stream broke
            await pending.put(_Failed(index, exc))
            return
        await pending.put(None)
