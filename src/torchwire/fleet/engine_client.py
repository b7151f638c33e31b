"""A worker's side of the engines (``--engine``): the model versions an engine holds, served
through this worker's protocol stack as if they were loaded here.

The worker's repository hands the versions an engine takes (``Engines.takes``) to ``Engines.load``,
which asks the device's engine to hold it (once for every worker) and returns a ``RemoteBatcher``:
the data plane admits, decodes and encodes as for any model, and the batcher writes the inputs into
this worker's arena and sends a descriptor instead of queueing here. A thread per engine
connection reads the answers and hands them over as the batcher's own inference threads would.

When the engine goes away (killed, or its device failed) every request waiting on it, and every
new one, is answered UNAVAILABLE with a time to retry after, while this worker reconnects to its
successor and asks it to hold the same versions again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchwire.config import ModelConfig, ServerSettings
from torchwire.errors import (
    QueueFullError,
    TorchwireError,
    UnavailableError,
    VersionClosedError,
    error_for_status,
    report_bug,
)
from torchwire.fleet.arena import Arena, aligned
from torchwire.fleet.engine_wire import Channel, Message, get_tensor, put_tensor
from torchwire.fleet.plan import device_key
from torchwire.metrics import Metrics, ModelMetrics
from torchwire.repository.sources import ModelSource
from torchwire.runtime import Batcher, Done, LoadedModel, ThreadLoad, Ticket
from torchwire.runtime.arrays import Arrays
from torchwire.runtime.batcher import deliver_here, retry_after
from torchwire.runtime.dtypes import numpy_dtype

log = logging.getLogger("torchwire.engine")

ARENA_BYTES = 256 << 20
"""Shared memory per worker and engine: requests in flight at once (pages are only backed once
written; a request that finds no room goes inline)."""
CONNECT_TIMEOUT_S = 60.0
"""How long a starting worker waits for its engine's socket (the supervisor starts the engine
first, so this is only reached when the engine cannot start)."""
RECONNECT_EVERY_S = 0.1
RETRY_AFTER_MS = 1000
"""What a request refused while the engine restarts is told to wait."""


def _restarting(device: str) -> UnavailableError:
    return UnavailableError(
        f"the engine of {device} is restarting; retry in about {RETRY_AFTER_MS} ms",
        metadata=retry_after(RETRY_AFTER_MS),
    )


@dataclass(eq=False)
class _Connection:
    """One connection to an engine: its socket, its arena, the requests waiting on it."""

    channel: Channel
    arena: Arena
    waiting: dict[int, _Waiting] = field(default_factory=dict)
    lost: bool = False


@dataclass(slots=True)
class _Waiting:
    batcher: RemoteBatcher
    ticket: Ticket
    slot: int | None  # the arena offset of its inputs and answer, freed on the answer
    sent: float  # time.perf_counter() when sent


class EngineClient:
    """This worker's connection to the engine of one device."""

    def __init__(self, device: str, path: str, worker: int, metrics: Metrics) -> None:
        self.device = device
        self.path = path
        self.worker = worker
        self._crossing = metrics.engine_crossing.labels(device)
        self._connection: _Connection | None = None
        self._ids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[Message]] = {}
        self._reconnecting: asyncio.Task[None] | None = None
        self.on_change: Callable[[str, bool], None] | None = None
        """Called on the event loop with (device, False) when the engine is lost and (device,
        True) once its successor holds this worker's versions again."""
        self._batchers: set[RemoteBatcher] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.pid = 0

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.lost

    async def start(self) -> None:
        """Connect, waiting up to ``CONNECT_TIMEOUT_S`` for the engine's socket."""
        self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                await asyncio.to_thread(self._connect)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"no engine for {self.device} at {self.path} after "
                        f"{CONNECT_TIMEOUT_S:.0f} s: {exc}"
                    ) from None
                await asyncio.sleep(RECONNECT_EVERY_S)

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            arena = Arena.create(ARENA_BYTES, f"torchwire-engine-{self.worker}")
        except OSError:
            sock.close()
            raise
        channel = Channel(sock)
        try:
            channel.send(("hello", self.worker), fds=[arena.fd])
        except OSError:
            channel.close()
            arena.close()
            raise
        connection = _Connection(channel, arena)
        self._connection = connection
        threading.Thread(
            target=self._read, args=(connection,), name=f"torchwire-engine-{self.device}",
            daemon=True,
        ).start()  # fmt: skip

    async def load(self, source: ModelSource, version: int, metrics: Metrics) -> RemoteBatcher:
        """Ask the engine to hold ``version`` of ``source``; the batcher that serves it here."""
        held = await self._hold(source, version)
        batcher = RemoteBatcher(self, source, version, held, metrics.for_model(source.name))
        self._batchers.add(batcher)
        return batcher

    async def _hold(self, source: ModelSource, version: int) -> Message:
        rid = next(self._ids)
        assert self._loop is not None
        answer: asyncio.Future[Message] = self._loop.create_future()
        self._asked[rid] = answer
        message = (
            "load", rid, source.name, version, str(source.files[version]), source.config,
            source.key(version),
        )  # fmt: skip
        try:
            self._send(message)
            reply = await answer
        finally:
            self._asked.pop(rid, None)
        if reply[0] == "failed":
            raise error_for_status(reply[2], reply[3])
        return reply

    def _send(self, message: Message) -> None:
        connection = self._connection
        if connection is None or connection.lost:
            raise _restarting(self.device)
        try:
            connection.channel.send(message)
        except OSError:
            raise _restarting(self.device) from None

    def release(self, batcher: RemoteBatcher) -> None:
        self._batchers.discard(batcher)
        with contextlib.suppress(UnavailableError):  # a new engine does not hold it anyway
            self._send(("release", batcher.handle))

    def infer(self, batcher: RemoteBatcher, ticket: Ticket) -> None:
        """Send one request (from any thread); its outcome goes to the ticket, from the reader
        thread. Raises ``UnavailableError`` when the engine is gone (then nothing else answers
        the ticket)."""
        connection = self._connection
        if connection is None or connection.lost:
            raise _restarting(self.device)
        arena, arrays, items = connection.arena, ticket.arrays, ticket.items
        sizes = [aligned(a.nbytes) for a in arrays]
        answer = batcher.answer_bytes(items)
        slot = None
        if not any(a.dtype.hasobject for a in arrays):
            slot = arena.allocate(sum(sizes) + max(answer, 0))
        try:
            inputs, at = [], slot if slot is not None else -1
            for array, size in zip(arrays, sizes, strict=True):
                inputs.append(put_tensor(arena if slot is not None else None, array, at))
                at = at + size if slot is not None else -1
        except ValueError:  # the arena was unmapped under us: the engine is gone
            if slot is not None:
                arena.free(slot)
            if connection.lost:
                raise _restarting(self.device) from None
            raise
        rid = next(self._ids)
        connection.waiting[rid] = _Waiting(batcher, ticket, slot, time.perf_counter())
        message = ("infer", rid, batcher.handle, items, ticket.deadline, inputs,
                   at if slot is not None and answer > 0 else -1, max(answer, 0))  # fmt: skip
        try:
            connection.channel.send(message)
        except BaseException as exc:
            if connection.waiting.pop(rid, None) is None:
                return  # the connection was lost meanwhile, and that answered it
            if slot is not None:
                arena.free(slot)
            if isinstance(exc, OSError):
                raise _restarting(self.device) from None
            raise

    def _read(self, connection: _Connection) -> None:
        """The reader thread: hand each answer to its request."""
        loop = self._loop
        assert loop is not None
        try:
            while True:
                for message in connection.channel.receive():
                    kind = message[0]
                    if kind == "ok" or kind == "err":
                        self._answered(message, connection, loop)
                    elif kind == "hello":
                        self.pid = message[1]
                    else:  # loaded / failed: a load's answer
                        loop.call_soon_threadsafe(self._settle, message)
        except (EOFError, OSError) as exc:
            if not self._closed:
                log.warning("lost the engine of %s: %s", self.device, exc)
        except Exception as exc:  # a bug of ours: start again on a new connection
            report_bug(log, f"reading the engine of {self.device}", exc)
        finally:
            self._lost(connection, loop)

    def _answered(
        self, message: Message, connection: _Connection, loop: asyncio.AbstractEventLoop
    ) -> None:
        waiting = connection.waiting.pop(message[1], None)
        if waiting is None:
            return
        outcome: Arrays | TorchwireError
        try:
            if message[0] == "ok":
                _, _, tensors, engine_s, queued = message
                # Copied out at once: the slot goes back to the ring now, whatever keeps the
                # answer.
                outcome = [np.array(get_tensor(connection.arena, t)) for t in tensors]
                waiting.batcher.engine_queued = queued
                self._crossing.observe(max(0.0, time.perf_counter() - waiting.sent - engine_s))
            else:
                _, _, code, text, metadata = message
                outcome = error_for_status(code, text)
                outcome.metadata = metadata
        except Exception as exc:
            outcome = report_bug(log, f"reading an answer of the engine of {self.device}", exc)
        finally:
            if waiting.slot is not None:
                connection.arena.free(waiting.slot)
        waiting.batcher.answered(waiting.ticket, outcome, loop)

    def _settle(self, message: Message) -> None:
        answer = self._asked.get(message[1])
        if answer is not None and not answer.done():
            answer.set_result(message)

    def _lost(self, connection: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        """The engine is gone: everything waiting on it is answered UNAVAILABLE; reconnect."""
        connection.lost = True
        connection.channel.close()  # before the waiting are listed: a send after this fails
        for rid in list(connection.waiting):
            waiting = connection.waiting.pop(rid, None)
            if waiting is not None:
                waiting.batcher.answered(waiting.ticket, _restarting(self.device), loop)
        connection.arena.close()
        if self._connection is not connection:
            return
        for batcher in list(self._batchers):
            batcher.ready = False
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is ending
            loop.call_soon_threadsafe(self._restart_later)

    def _restart_later(self) -> None:
        if self.on_change is not None:
            self.on_change(self.device, False)
        for rid, answer in list(self._asked.items()):
            if not answer.done():
                answer.set_exception(_restarting(self.device))
            self._asked.pop(rid, None)
        if not self._closed and self._reconnecting is None:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Connect to the engine's successor and have it hold this worker's versions again;
        start over if it goes away meanwhile (one of these runs at a time)."""
        try:
            while not self._closed:
                try:
                    await asyncio.to_thread(self._connect)
                except OSError:
                    await asyncio.sleep(RECONNECT_EVERY_S)
                    continue
                connection, held = self._connection, 0
                for batcher in list(self._batchers):
                    try:
                        batcher.rehold(await self._hold(batcher.source, batcher.version))
                        held += 1
                    except TorchwireError as exc:
                        if not self.connected:
                            break
                        log.error(
                            "the new engine of %s cannot hold %s (its requests are answered "
                            "UNAVAILABLE until it is reloaded): %s", self.device, batcher.label,
                            exc,
                        )  # fmt: skip
                if connection is self._connection and self.connected:
                    if self.on_change is not None:
                        self.on_change(self.device, True)
                    log.info(
                        "reconnected to the engine of %s (pid %d): it holds %d of this "
                        "worker's model versions again", self.device, self.pid, held,
                    )  # fmt: skip
                    return
        finally:
            self._reconnecting = None

    async def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            self._connection.channel.close()


class RemoteBatcher(Batcher):
    """A model version held by an engine, as the data plane sees a loaded one: its signature
    (from the engine's load), admission, and a queue that is the engine's."""

    def __init__(
        self,
        client: EngineClient,
        source: ModelSource,
        version: int,
        held: Message,
        metrics: ModelMetrics | None = None,
    ) -> None:
        _, _, handle, engine_config, cost, pid = held
        update = {"outputs": engine_config.outputs, "instances": engine_config.instances}
        config = source.config.model_copy(update=update)  # the signature and threads it runs
        face = LoadedModel(None, config, source.files[version], torch.device(client.device))
        super().__init__(face, source.name, version, cost, metrics)  # refusals counted here
        self.inline_items = self._inline_measured = 0  # the engine decides where batches run
        self.source = source
        self.handle: int = handle
        self.host = f"engine of {client.device} (pid {pid})"
        self.ready = True
        self.engine_queued = 0
        """Items queued in the engine when it last answered (admission reads it)."""
        self._client = client
        self._inflight = 0
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        # Bytes per item of each output; None where not known before the answer.
        self._answer_sizes = [
            None if -1 in spec.shape or spec.dtype == "BYTES" else
            int(np.prod(spec.shape, dtype=np.int64)) * numpy_dtype(spec.dtype).itemsize
            for spec in config.outputs
        ]  # fmt: skip

    def answer_bytes(self, items: int) -> int:
        """Room for ``items`` items of answer behind the inputs (-1: not known in advance)."""
        sizes = self._answer_sizes
        if None in sizes:
            return -1
        return sum(aligned(items * size) for size in sizes if size is not None)

    def rehold(self, held: Message) -> None:
        """The engine's successor holds this version again."""
        self.handle = held[2]
        self.host = f"engine of {self._client.device} (pid {held[5]})"
        self.ready = True

    @property
    def available(self) -> bool:
        return not self._closing and self.ready and self._client.connected

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop  # no threads: the engine's compute

    def _check_open(self) -> None:
        if self._closing or self._loop is None:
            raise VersionClosedError(f"model {self.label} is shutting down")
        if not self.ready or not self._client.connected:
            raise _restarting(self._client.device)

    def submit(
        self, arrays: Sequence[np.ndarray[Any, Any]], items: int, deadline: float | None = None
    ) -> asyncio.Future[Arrays]:
        self._check_open()
        assert self._loop is not None
        future: asyncio.Future[Arrays] = self._loop.create_future()
        self._send(Ticket(arrays, items, future, deadline))
        return future

    def enqueue(
        self,
        arrays: Sequence[np.ndarray[Any, Any]],
        items: int,
        deadline: float | None,
        done: Done,
    ) -> Ticket:
        self._check_open()
        ticket = Ticket(arrays, items, None, deadline, done)
        self._send(ticket)
        return ticket

    def dispatch(self, load: ThreadLoad) -> None:
        """Nothing to run here: each request left when it was queued."""

    def _send(self, ticket: Ticket) -> None:
        with self._lock:
            self._inflight += 1
            self._idle.clear()
        try:
            self._client.infer(self, ticket)
        except BaseException:
            self._left()
            raise

    def _left(self) -> None:
        with self._lock:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    def answered(
        self, ticket: Ticket, outcome: Arrays | TorchwireError, loop: asyncio.AbstractEventLoop
    ) -> None:
        """On the reader thread: one request's outcome, counted, to its caller."""
        elapsed = int((time.monotonic() - ticket.enqueued_at) * 1e9)
        stats = self.stats
        if isinstance(outcome, TorchwireError):
            stats.fail_count += 1
            stats.fail_ns += elapsed
        else:
            stats.success_count += 1
            stats.success_ns += elapsed
            stats.inference_count += ticket.items
            stats.last_inference_ms = int(time.time() * 1000)
        self._left()
        deliver_here([(ticket, outcome)], loop)

    def admit(self, deadline: float | None, now: float) -> None:
        """As ``Batcher.admit``, on the engine's queue as it last reported it."""
        self._check_open()
        if self.engine_queued >= self.max_queue:
            if self._metrics is not None:
                self._metrics.queue_full.inc()
            wait_ms = self._compute_ms(self.engine_queued)
            raise QueueFullError(
                f"model {self.label}: the engine's queue is full ({self.engine_queued} of "
                f"{self.max_queue} items); retry in about {wait_ms} ms",
                metadata=retry_after(wait_ms),
            )
        self._check_deadline(self.engine_queued, deadline, now, " in the engine")

    def _per_item_s(self) -> float:
        full = self.cost.seconds(self.max_batch_size)
        return full / self.max_batch_size if full else 1e-3

    async def close(self, timeout_s: float = 30.0) -> bool:
        """Refuse new requests, wait for the ones in the engine, and let the engine go of it."""
        self._closing = True
        drained = await asyncio.to_thread(self._idle.wait, timeout_s)
        self._client.release(self)
        return drained


class Engines:
    """The ``Offload`` of a worker: the model versions the engines take, and their clients."""

    def __init__(self, settings: ServerSettings, sockets: dict[str, str], worker: int) -> None:
        self._settings = settings
        self._sockets = sockets
        self._worker = worker
        self._clients: dict[str, EngineClient] = {}
        self._starting: dict[str, asyncio.Task[EngineClient]] = {}
        self._warned: set[str] = set()
        self._down: set[str] = set()
        self.on_change: Callable[[bool], None] | None = None
        """Called on the event loop with False when an engine is lost, True once all answer."""

    def takes(self, config: ModelConfig) -> bool:
        if not self._settings.engine_wanted(config):
            return False
        device = device_key(config.instances.device)
        if device in self._sockets:
            return True
        if device not in self._warned:
            self._warned.add(device)
            log.warning(
                "a model on %s wants an engine, but none was started for that device (the "
                "supervisor starts engines for the models it finds at start-up): loaded in "
                "each worker", device,
            )  # fmt: skip
        return False

    async def load(self, source: ModelSource, version: int, metrics: Metrics) -> Batcher:
        device = device_key(source.config.instances.device)
        client = self._clients.get(device)
        if client is None:
            starting = self._starting.get(device)
            if starting is None:
                starting = asyncio.create_task(self._open(device, metrics))
                self._starting[device] = starting
            client = await asyncio.shield(starting)  # one caller cancelled cancels not all
        return await client.load(source, version, metrics)

    async def _open(self, device: str, metrics: Metrics) -> EngineClient:
        client = EngineClient(device, self._sockets[device], self._worker, metrics)
        client.on_change = self._changed
        try:
            await client.start()
        finally:
            self._starting.pop(device, None)
        self._clients[device] = client
        return client

    def _changed(self, device: str, up: bool) -> None:
        (self._down.discard if up else self._down.add)(device)
        if self.on_change is not None:
            self.on_change(not self._down)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
