"""The founding document's ``ModelService``: ``Predict`` and ``PredictStream``.

Protocol adapter only: decode to arrays, ask the repository for the model version, await its
batcher, encode. ``PredictStream`` reads ahead (``read_ahead``): the answers go back one per
request, in request order; the first request refused ends the stream with its status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator

import grpc

from torchwire.errors import TorchwireError
from torchwire.server.common.observe import Call, Observer
from torchwire.server.common.status import abort_with, stream_errors, unary_errors
from torchwire.server.plane.inference import DataPlane
from torchwire.server.rpc.read_ahead import read_ahead

SEED_SERVICE = "ModelService"


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` instant, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


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
        deadline = call_deadline(context)

        def open_call() -> Call:
            return self._observer.call("seed_stream", context)

        async with read_ahead(
            requests,
            open_call,
            lambda data, call: self._plane.seed(data, call, deadline),
            stop_at_error=True,
        ) as entries:
            async for entry in entries:
                prefix = f"request {entry.index} of the stream: "
                call = entry.call or open_call()  # a broken request stream: counted as one
                if entry.error is not None:  # the stream ends with the first refusal
                    call.finish(entry.error)
                    await abort_with(context, entry.error, prefix)
                assert entry.inference is not None and entry.answer is not None
                try:
                    response = entry.inference.encode(await entry.answer)
                except TorchwireError as exc:
                    call.finish(exc)
                    await abort_with(context, exc, prefix)
                call.finish()
                yield response
