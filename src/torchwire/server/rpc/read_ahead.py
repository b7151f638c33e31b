"""A stream's read-ahead, for ``PredictStream`` and ``ModelStreamInfer`` alike: each request is
admitted, decoded and queued the moment it arrives, so that a stream's requests share batches with
each other and with everyone else's, while the servicer takes them back in request order and
answers each once it and those before it are done.

At most ``STREAM_WINDOW`` requests of one stream wait at a time: flow control, so that one fast
writer cannot fill a model's queue alone. Whatever is not answered when the stream ends (the
caller went away, an error ended it) is counted as cancelled and dropped from its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from torchwire.errors import TorchwireError, report_bug
from torchwire.runtime.arrays import Arrays
from torchwire.server.common.observe import Call

log = logging.getLogger(__name__)

STREAM_WINDOW = 128
"""Requests of one stream queued or computing before the stream stops reading."""


class Inference(Protocol):
    """What the data plane returns for a request (``SeedInference``, ``V2Inference``)."""

    def submit(self) -> asyncio.Future[Arrays]: ...


R = TypeVar("R")
I = TypeVar("I", bound=Inference)  # noqa: E741


@dataclass(slots=True)
class Pending(Generic[R, I]):
    """One request of the stream, in order: queued (``inference`` and ``answer``), or refused
    before it could be (``error``). ``broken``: the request stream itself failed here (``error``
    says how), and nothing follows; no request was read, so it has no ``call`` (the servicer
    opens one if it answers the failure as a request)."""

    index: int
    request: R | None
    call: Call | None
    inference: I | None = None
    answer: asyncio.Future[Arrays] | None = None
    error: Exception | None = None
    broken: bool = False

    def abandon(self) -> None:
        """Counted as cancelled (if it was not counted already) and dropped from its batch."""
        if self.call is not None:
            self.call.finish(asyncio.CancelledError())
        if self.answer is not None:
            self.answer.cancel()


def _queued(entry: Pending[R, I], begin: Callable[[R, Call], I]) -> Pending[R, I]:
    """``entry`` queued, or holding why it could not be."""
    assert entry.request is not None and entry.call is not None
    try:
        entry.inference = begin(entry.request, entry.call)
        entry.answer = entry.inference.submit()
    except TorchwireError as exc:
        entry.error = exc
    except Exception as exc:  # a bug: this request fails
        entry.error = report_bug(log, "unexpected error queueing a stream request", exc)
    return entry


@contextlib.asynccontextmanager
async def read_ahead(
    requests: AsyncIterable[R],
    open_call: Callable[[], Call],
    begin: Callable[[R, Call], I],
    stop_at_error: bool,
) -> AsyncIterator[AsyncIterator[Pending[R, I]]]:
    """The stream's requests, each already queued (``begin``: the data plane's admission and
    decoding, then ``submit``), in order. ``stop_at_error``: stop reading after a refused
    request (the seed API ends the call there; V2 answers it with an error and goes on)."""
    pending: asyncio.Queue[Pending[R, I] | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

    async def read() -> None:
        index = 0
        try:
            async for request in requests:
                entry = _queued(Pending(index, request, open_call()), begin)
                try:
                    await pending.put(entry)
                except asyncio.CancelledError:  # the stream ended while the window was full
                    entry.abandon()
                    raise
                if entry.error is not None and stop_at_error:
                    break
                index += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the request stream itself broke (or a message was malformed)
            await pending.put(Pending(index, None, None, error=exc, broken=True))
        await pending.put(None)

    reader = asyncio.create_task(read())
    taken: list[Pending[R, I]] = []

    async def entries() -> AsyncIterator[Pending[R, I]]:
        while (entry := await pending.get()) is not None:
            taken[:] = [entry]
            yield entry

    try:
        yield entries()
    finally:
        reader.cancel()
        abandoned = list(taken)
        while not pending.empty():
            left = pending.get_nowait()
            if left is not None:
                abandoned.append(left)
        for entry in abandoned:
            entry.abandon()
