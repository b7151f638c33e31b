"""``AsyncClient``: the asyncio client of the seed API."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
import numpy as np

from torchwire.client._channel import ClientBase
from torchwire.client._seed import (
    NDArray,
    decode_response,
    encode_request,
    error_from,
    item_shape_from,
    items_of,
)
from torchwire.errors import TorchwireError


class AsyncClient(ClientBase):
    """Calls a torchwire server (or several) over a pool of channels used round-robin (see
    ``ClientBase`` for the arguments and errors)."""

    _grpc = grpc.aio

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
