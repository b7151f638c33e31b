"""``AsyncClient``: the asyncio client (seed API or KServe V2)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
import numpy as np

from torchwire.client import _v2 as v2
from torchwire.client._channel import NON_FATAL, ClientBase
from torchwire.client._seed import NDArray, error_from, item_shape_from
from torchwire.errors import TorchwireError


class AsyncClient(ClientBase):
    """Calls a torchwire server (or several) over a pool of channels used round-robin (see
    ``ClientBase`` for the arguments and errors)."""

    _grpc = grpc.aio

    async def _spec(self, model: str, version: int | str | None, timeout: float | None) -> None:
        if self._needs_spec(model, version):
            call = self._metadata[self._next()]
            try:
                data = await call(
                    v2.metadata_request(model, version), timeout=timeout, metadata=self._auth
                )
            except grpc.RpcError as exc:
                raise error_from(exc) from None
            self._keep_spec(model, version, data)

    async def predict(
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
        await self._spec(model, version, timeout)
        body = self._encode(model, array, version)
        try:
            data = await self._call(body, timeout)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return self._decode(data, array)

    async def _call(self, body: bytes, timeout: float | None) -> bytes:
        """One unary call, hedged after ``hedge_after`` (see ``ClientBase``). Until a hedge is
        sent, a call costs one timer and one callback more than an unhedged one (no task)."""
        index = self._next()
        call = self._predict[index](body, timeout=timeout, metadata=self._auth)
        if self.hedge_after is None:
            return await call  # type: ignore[no-any-return]
        self._hedges.earn()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        calls = [call]
        woken: asyncio.Future[None] = loop.create_future()  # an answer, or the hedge's time

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        call.add_done_callback(wake)
        timer = loop.call_later(self.hedge_after, wake)
        tasks: list[asyncio.Future[Any]] = []
        try:
            await woken
            left = None if deadline is None else deadline - loop.time()
            if call.done() or (left is not None and left <= 0) or not self._hedges.spend():
                return await call  # type: ignore[no-any-return]
            other = self._predict[self._hedge_to[index]]
            calls.append(other(body, timeout=left, metadata=self._auth))
            tasks = [asyncio.ensure_future(attempt) for attempt in calls]
            pending, failure = set(tasks), None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # Both may be done in one turn: an answer wins over a failure, whatever order.
                outcomes = [(task, task.exception()) for task in done]
                for task, error in outcomes:
                    if error is None:
                        return task.result()  # type: ignore[no-any-return]
                for _, error in outcomes:
                    if error.code() not in NON_FATAL:  # type: ignore[union-attr]
                        raise error  # type: ignore[misc]
                    failure = error
            raise failure  # type: ignore[misc]
        finally:
            timer.cancel()
            for attempt in calls:
                attempt.cancel()  # the slower attempt: the server drops it (nothing if done)
            for task in tasks:  # its outcome is read here if not above: nothing to log later
                task.add_done_callback(_read_outcome)

    async def stream(
        self,
        model: str,
        arrays: Iterable[Any] | AsyncIterable[Any],
        version: int | str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[NDArray]:
        """One stream: yields the answer to each array, in order, as it comes."""
        await self._spec(model, version, timeout or self.timeout)
        sent: deque[NDArray] = deque()

        def request(item: Any) -> bytes:
            array = np.asarray(item)
            sent.append(array)
            return self._encode(model, array, version)

        async def requests() -> AsyncIterator[bytes]:
            if isinstance(arrays, AsyncIterable):
                async for item in arrays:
                    yield request(item)
            else:
                for item in arrays:
                    yield request(item)

        call = self._streams[self._next()](requests(), timeout=timeout, metadata=self._auth)
        try:
            async for data in call:
                yield self._decode(data, sent.popleft(), stream=True)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            call.cancel()

    async def item_shape(self, model: str, timeout: float | None = None) -> tuple[int, ...]:
        """The model's per-item input shape, as the server announces it."""
        if self.protocol == "v2":
            await self._spec(model, None, timeout or self.timeout)
            return self._specs[(model, "")].item_shape
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


def _read_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
