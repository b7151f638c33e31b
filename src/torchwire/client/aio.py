"""``AsyncClient``: the asyncio client of the seed API."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, Literal

import grpc
import numpy as np

from torchwire.client._channel import TLS, channel_options
from torchwire.client._seed import (
    PREDICT,
    PREDICT_STREAM,
    NDArray,
    decode_response,
    encode_request,
    error_from,
    item_shape_from,
    items_of,
    spread,
)
from torchwire.errors import TorchwireError


class AsyncClient:
    """Calls a torchwire server (or several) over a pool of channels used round-robin.

    Args:
        targets: ``host:port`` or a list of them; channels are spread over the targets.
        pool_size: channels (each its own connection).
        timeout: default deadline of each call, in seconds.
        protocol: ``"seed"`` (the founding ``ModelService``); ``"v2"`` comes with that API.
        raw: send floats as one ``raw_inputs`` buffer (fast) instead of ``repeated float``.
        retries: retries of UNAVAILABLE with exponential backoff (0: none).
        keepalive_s: HTTP/2 keepalive ping interval while calls are active (0: off).
        tls: TLS settings; ``None`` for plaintext.

    Raises (from each call): ``InvalidInputError``, ``ModelNotFoundError``, ``QueueFullError``,
    ``DeadlineExceededError``, ``UnavailableError``, ``ModelExecutionError``, or
    ``TorchwireError`` for other statuses, each with ``code`` set to the status name.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        pool_size: int = 4,
        timeout: float | None = 1.0,
        protocol: Literal["seed", "v2"] = "seed",
        raw: bool = True,
        retries: int = 3,
        keepalive_s: float = 30.0,
        tls: TLS | None = None,
    ) -> None:
        if protocol != "seed":
            raise ValueError("protocol 'v2' needs the KServe V2 API, which this server lacks")
        options = channel_options(retries, keepalive_s, tls)
        self.timeout = timeout
        self.raw = raw
        self._channels = [
            grpc.aio.secure_channel(t, tls.credentials(), options)
            if tls
            else grpc.aio.insecure_channel(t, options)
            for t in spread(targets, pool_size)
        ]
        self._predict = [ch.unary_unary(PREDICT) for ch in self._channels]
        self._streams = [ch.stream_stream(PREDICT_STREAM) for ch in self._channels]
        self._turn = itertools.count()

    def _next(self) -> int:
        return next(self._turn) % len(self._channels)

    async def predict(
        self,
        model: str,
        array: Any,
        version: int | str | None = None,
        timeout: float | None = None,
    ) -> NDArray:
        """Answer for every item of ``array``: shape ``(items, -1)``, or flat for a 1-D array."""
        array = np.asarray(array)
        body = encode_request(model, array, version, self.raw)
        try:
            data = await self._predict[self._next()](body, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return decode_response(data, items_of(array))

    async def stream(
        self,
        model: str,
        arrays: Iterable[Any] | AsyncIterable[Any],
        version: int | str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[NDArray]:
        """One ``PredictStream``: yields the answer to each array, in order, as it comes."""
        shapes: deque[int | None] = deque()

        async def requests() -> AsyncIterator[bytes]:
            if isinstance(arrays, AsyncIterable):
                async for item in arrays:
                    yield self._stream_request(model, item, version, shapes)
            else:
                for item in arrays:
                    yield self._stream_request(model, item, version, shapes)

        call = self._streams[self._next()](requests(), timeout=timeout)
        try:
            async for data in call:
                yield decode_response(data, shapes.popleft())
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            call.cancel()

    def _stream_request(
        self, model: str, item: Any, version: int | str | None, shapes: deque[int | None]
    ) -> bytes:
        array = np.asarray(item)
        shapes.append(items_of(array))
        return encode_request(model, array, version, self.raw)

    async def item_shape(self, model: str, timeout: float | None = None) -> tuple[int, ...]:
        """The model's per-item input shape, as the server announces it."""
        try:
            await self.predict(model, np.zeros(0, np.float32), timeout=timeout)
        except TorchwireError as exc:
            return item_shape_from(exc)
        raise TorchwireError(f"server accepted an empty request for {model!r}", "UNKNOWN")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every channel is connected."""
        await asyncio.wait_for(
            asyncio.gather(*(ch.channel_ready() for ch in self._channels)), timeout
        )

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
