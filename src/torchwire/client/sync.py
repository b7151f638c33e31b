"""``Client``: the blocking client, the same requests and errors as ``AsyncClient``."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
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


class Client(ClientBase):
    """Blocking twin of ``AsyncClient``: same arguments, same answers, same exceptions."""

    _grpc = grpc

    def predict(
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
            data = self._predict[self._next()](body, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return decode_response(data, items_of(array))

    def stream(
        self,
        model: str,
        arrays: Iterable[Any],
        version: int | str | None = None,
        timeout: float | None = None,
    ) -> Iterator[NDArray]:
        """One ``PredictStream``: yields the answer to each array, in order, as it comes."""
        shapes: deque[int | None] = deque()

        def requests() -> Iterator[bytes]:
            for item in arrays:
                array = np.asarray(item)
                shapes.append(items_of(array))
                yield encode_request(model, array, version, self.raw)

        call = self._streams[self._next()](requests(), timeout=timeout)
        try:
            for data in call:
                yield decode_response(data, shapes.popleft())
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            call.cancel()

    def item_shape(self, model: str, timeout: float | None = None) -> tuple[int, ...]:
        """The model's per-item input shape, as the server announces it."""
        try:
            self.predict(model, np.zeros(0, np.float32), timeout=timeout)
        except TorchwireError as exc:
            return item_shape_from(exc)
        raise TorchwireError(f"server accepted an empty request for {model!r}", "UNKNOWN")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every channel is connected."""
        for channel in self._channels:
            grpc.channel_ready_future(channel).result(timeout=timeout)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
