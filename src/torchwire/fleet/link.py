"""The supervisor's link to one worker: newline-delimited JSON over a socket pair, both ways.

A message with an ``id`` is a request: the other side answers it exactly once with
``{"re": id, "result": {...}}`` or ``{"re": id, "error": {"code": ..., "message": ...}}``, and
``request`` returns the result or raises the ``torchwire.errors`` exception of that status. A
message without an ``id`` is a notice and gets no answer. Requests are handled concurrently, so a
side can ask while it answers. The link ends at EOF, when the other process exits or closes it:
``closed`` is set and every request still waiting fails with ``UnavailableError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from torchwire.errors import TorchwireError, UnavailableError, error_for_status, report_bug

log = logging.getLogger(__name__)

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None]]

LINE_LIMIT = 1 << 20
"""Longest message: a load error lists the reason of every version, which can be long."""


class Link:
    """One end of a worker link; make it with ``Link.open``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, sock: socket.socket, handler: Handler) -> Link:
        """Start reading from ``sock``; ``handler`` answers the other side's messages."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer, handler)

    async def request(self, message: Message) -> Message:
        """Send ``message`` and wait for its answer.

        Raises:
            TorchwireError: the subclass of the status the other side answered with.
            UnavailableError: the link closed before the answer came.
        """
        if self.closed.is_set():
            raise UnavailableError("the worker link is closed")
        ident = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[ident] = answer
        try:
            await self._send({**message, "id": ident})
            reply = await answer
        finally:
            self._waiting.pop(ident, None)
        if "error" in reply:
            raise error_for_status(reply["error"]["code"], reply["error"]["message"])
        result: Message = reply.get("result", {})
        return result

    async def notify(self, message: Message) -> None:
        """Send ``message``; nothing answers it."""
        await self._send(message)

    async def _send(self, message: Message) -> None:
        try:
            self._writer.write(json.dumps(message).encode() + b"\n")
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise UnavailableError(f"the worker link is closed: {exc}") from None

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "re" in message:
                    waiting = self._waiting.get(message["re"])
                    if waiting is not None and not waiting.done():
                        waiting.set_result(message)
                else:
                    task = asyncio.create_task(self._answer(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (ConnectionError, ValueError) as exc:
            log.warning("worker link broken: %s", exc)
        finally:
            self.closed.set()
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(UnavailableError("the other end of the link went away"))

    async def _answer(self, message: Message) -> None:
        ident = message.get("id")
        try:
            result = await self._handler(message)
            reply: Message = {"re": ident, "result": result or {}}
        except TorchwireError as exc:
            reply = {"re": ident, "error": {"code": exc.code, "message": str(exc)}}
        except Exception as exc:
            bug = report_bug(log, f"unexpected error answering {message}", exc)
            reply = {"re": ident, "error": {"code": "INTERNAL", "message": str(bug)}}
        if ident is not None:
            with contextlib.suppress(UnavailableError):
                await self._send(reply)

    async def close(self) -> None:
        """Close this end; the other end sees EOF."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        await asyncio.gather(self._reading, *self._tasks, return_exceptions=True)
