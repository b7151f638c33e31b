"""``Client``: the blocking client, the same requests and errors as ``AsyncClient``."""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import numpy as np

from torchwire.client import _v2 as v2
from torchwire.client._channel import NON_FATAL, ClientBase
from torchwire.client._seed import NDArray, error_from, item_shape_from
from torchwire.errors import TorchwireError


class Client(ClientBase):
    """Blocking twin of ``AsyncClient``: same arguments, same answers, same exceptions."""

    _grpc = grpc

    def _spec(
        self, model: str, version: int | str | None, timeout: float | None, asked: bool = False
    ) -> None:
        if self._needs_spec(model, version, asked):
            call = self._metadata[self._next()]
            try:
                data = call(
                    v2.metadata_request(model, version), timeout=timeout, metadata=self._auth
                )
            except grpc.RpcError as exc:
                raise error_from(exc) from None
            self._keep_spec(model, version, data)

    def predict(
        self,
        model: str,
        array: Any,
        version: int | str | None = None,
        timeout: float | None = None,
    ) -> NDArray:
        """Answer for every item of ``array``: shape ``(items, -1)``, or flat for a 1-D array
        (seed); the model's output shape (V2)."""
        array = np.asarray(array)
        timeout = timeout or self.timeout
        self._spec(model, version, timeout)
        body = self._encode(model, array, version)
        try:
            data = self._call(body, timeout)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return self._decode(data, array)

    def _call(self, body: bytes, timeout: float | None) -> bytes:
        """One unary call, hedged after ``hedge_after`` (see ``ClientBase``)."""
        if self.hedge_after is None:
            return self._predict[self._next()](body, timeout=timeout, metadata=self._auth)  # type: ignore[no-any-return]
        self._hedges.earn()
        deadline = None if timeout is None else time.monotonic() + timeout
        index = self._next()
        first = self._predict[index].future(body, timeout=timeout, metadata=self._auth)
        try:
            return first.result(timeout=self.hedge_after)  # type: ignore[no-any-return]
        except grpc.FutureTimeoutError:
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not self._hedges.spend():
                return first.result()  # type: ignore[no-any-return]
        except BaseException:  # interrupted (Ctrl-C): the call must not run on
            first.cancel()
            raise
        other = self._predict[self._hedge_to[index]]
        calls = [first, other.future(body, timeout=left, metadata=self._auth)]
        finished: queue.SimpleQueue[grpc.Future] = queue.SimpleQueue()
        for call in calls:
            call.add_done_callback(finished.put)
        try:
            for waiting in range(len(calls), 0, -1):
                call = finished.get()
                error = call.exception()
                if error is None:
                    return call.result()  # type: ignore[no-any-return]
                if waiting == 1 or error.code() not in NON_FATAL:
                    raise error
            raise AssertionError("unreachable")
        finally:
            for call in calls:
                call.cancel()  # the slower attempt: the server drops it (nothing if done)

    def stream(
        self,
        model: str,
        arrays: Iterable[Any],
        version: int | str | None = None,
        timeout: float | None = None,
    ) -> Iterator[NDArray]:
        """One stream: yields the answer to each array, in order, as it comes."""
        self._spec(model, version, timeout or self.timeout)
        sent: deque[NDArray] = deque()

        def requests() -> Iterator[bytes]:
            for item in arrays:
                array = np.asarray(item)
                sent.append(array)
                yield self._encode(model, array, version)

        call = self._streams[self._next()](requests(), timeout=timeout, metadata=self._auth)
        try:
            for data in call:
                yield self._decode(data, sent.popleft(), stream=True)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            call.cancel()

    def item_shape(self, model: str, timeout: float | None = None) -> tuple[int, ...]:
        """The model's per-item input shape, as the server announces it."""
        if self.protocol == "v2":
            self._spec(model, None, timeout or self.timeout)
            return self._specs[(model, "")].item_shape
        try:
            self.predict(model, np.zeros(0, np.float32), timeout=timeout)
        except TorchwireError as exc:
            return item_shape_from(exc)
        raise TorchwireError(f"server accepted an empty request for {model!r}", "UNKNOWN")

    def spec(self, model: str, version: int | str | None = None) -> v2.Spec:
        """The model's first input (V2 metadata, over either protocol)."""
        self._spec(model, version, self.timeout, asked=True)
        return self._specs[(model, str(version or ""))]

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every channel is connected.

        Raises:
            grpc.FutureTimeoutError: a channel was not ready within ``timeout`` seconds.
        """
        for channel in self._channels:
            ready = grpc.channel_ready_future(channel)
            try:
                ready.result(timeout=timeout)
            finally:
                # A future left waiting keeps grpc's connectivity thread polling the channel,
                # and that thread dies with "Channel closed!" once the channel is closed.
                ready.cancel()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
