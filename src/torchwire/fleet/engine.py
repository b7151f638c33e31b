"""An engine: ``python -m torchwire.fleet.engine``, started by the supervisor, one per device.

It holds each model version the workers ask for once, whatever the number of workers, batches
the requests of all of them together and runs the model with no protocol stack in its process:
the workers speak gRPC and REST, decode, and send a descriptor of tensors already in shared
memory (``fleet.engine_wire``). Each worker connection has a thread of its own that reads the
descriptors, queues them on the version's ``Batcher`` without touching the event loop, and hands
them to the inference threads (or, for a model cheaper than the hand-over, runs them itself, as
the native front end does); the answer is written back into the worker's arena by the thread
that computed it.

A version stays held while a worker holds it. A worker that asks to release it (a reload, an
unload) lets it go at once; one whose connection drops (it died, or restarts) lets it go after
``KEEP_UNHELD_S``, so that a restarted worker finds it still loaded. A device that fails for
good ends the process with exit code 4; the supervisor starts another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchwire.config import ModelConfig
from torchwire.errors import (
    DEVICE_FAILED,
    DeviceFailedError,
    TorchwireError,
    UnavailableError,
    report_bug,
)
from torchwire.fleet.arena import Arena, aligned
from torchwire.fleet.contract import EngineSpec, Ready, to_message
from torchwire.fleet.engine_wire import Channel, Message, get_tensor, put_tensor
from torchwire.fleet.link import Link
from torchwire.logs import configure_logging
from torchwire.metrics import Metrics
from torchwire.native import tune_malloc
from torchwire.repository.repository import load_batcher
from torchwire.repository.sources import ModelSource
from torchwire.runtime import Batcher, ThreadLoad
from torchwire.runtime.arrays import Arrays
from torchwire.runtime.gpu import observe_gpus, read_gpus

log = logging.getLogger("torchwire.engine")

KEEP_UNHELD_S = 30.0
"""A version whose last holder's connection dropped stays loaded this long for its successor."""

HoldKey = tuple[str, int, str, Any]  # name, version, file, stamps


@dataclass(eq=False)
class _Held:
    """A model version held for workers."""

    handle: int
    key: HoldKey
    batcher: Batcher
    holders: collections.Counter[int] = field(default_factory=collections.Counter)
    orphaned: asyncio.TimerHandle | None = None


def engine_config(config: ModelConfig, device: str, workers: int) -> ModelConfig:
    """The config a model runs under in this engine. On a CPU, one whose ``[instances] count``
    is not set gets one inference thread per worker feeding the engine (the cores shared among
    them, as ``cost.measure`` does): the parallelism those workers had as whole servers, which
    one thread on every core does not reach (docs/engines.md, "CPU models")."""
    if device != "cpu" or workers <= 1 or "count" in config.instances.model_fields_set:
        return config
    instances = config.instances.model_copy(update={"count": workers})
    return config.model_copy(update={"instances": instances})


class EngineHost:
    """The versions this engine holds, and who holds them (on the event loop)."""

    def __init__(self, device: str, torch_threads: int, metrics: Metrics, workers: int = 1) -> None:
        self.device = device
        self._torch_threads = torch_threads
        self._workers = workers
        self.metrics = metrics
        self._handles = itertools.count(1)
        self._held: dict[HoldKey, _Held] = {}
        self.by_handle: dict[int, _Held] = {}
        self._loading: dict[HoldKey, asyncio.Future[_Held]] = {}
        self._retiring: set[asyncio.Task[bool]] = set()
        self._ended: set[int] = set()  # sessions whose worker left
        self._frozen = False
        self.device_failed = asyncio.Event()

    async def hold(
        self, session: int, name: str, version: int, path: str, config: ModelConfig, stamps: Any
    ) -> _Held:
        key: HoldKey = (name, version, path, stamps)
        held = self._held.get(key)
        if held is None:
            loading = self._loading.get(key)
            if loading is None:  # the first worker to ask loads it; the others wait for it
                loading = asyncio.ensure_future(self._load(key, config))
                self._loading[key] = loading
                loading.add_done_callback(lambda _: self._loading.pop(key, None))
            held = await asyncio.shield(loading)
        if session in self._ended:  # it left while this loaded: hold nothing for it
            if not +held.holders and held.orphaned is None:
                self._orphan(held)
            raise UnavailableError("the worker that asked for this model left")
        if held.orphaned is not None:
            held.orphaned.cancel()
            held.orphaned = None
        held.holders[session] += 1
        return held

    async def _load(self, key: HoldKey, config: ModelConfig) -> _Held:
        name, version, path, _ = key
        config = engine_config(config, self.device, self._workers)
        source = ModelSource(name, config, {version: Path(path)})
        try:
            batcher = await asyncio.to_thread(
                load_batcher, source, version, self._torch_threads, 0, self.metrics,
                self._device_failed,  # the batcher calls it on this loop
            )  # fmt: skip
        except DeviceFailedError as exc:  # in its warm-up: this engine must start again
            self._device_failed(exc)
            raise
        batcher.start(asyncio.get_running_loop())
        if not self._frozen:
            # As a server does after its loads: torch's and the first model's long-lived objects
            # out of the collector's walks, which would stall every thread here under load. Once:
            # what later versions leave behind when retired must stay collectable.
            self._frozen = True
            gc.collect()
            gc.freeze()
        held = _Held(next(self._handles), key, batcher)
        self._held[key] = held
        self.by_handle[held.handle] = held
        return held

    def _device_failed(self, failure: DeviceFailedError) -> None:
        log.critical("engine of %s: %s: stopping, to be started again", self.device, failure)
        self.device_failed.set()

    def release(self, session: int, handle: int) -> None:
        """``session`` no longer serves ``handle``: retire it when nobody does."""
        held = self.by_handle.get(handle)
        if held is None or not held.holders[session]:
            return
        held.holders[session] -= 1
        if not +held.holders:
            self._retire(held)

    def session_ended(self, session: int) -> None:
        """A worker's connection dropped: what only it held is retired after a while."""
        self._ended.add(session)
        for held in list(self.by_handle.values()):
            if held.holders.pop(session, 0) and not +held.holders:
                self._orphan(held)

    def _orphan(self, held: _Held) -> None:
        held.orphaned = asyncio.get_running_loop().call_later(KEEP_UNHELD_S, self._retire, held)

    def _retire(self, held: _Held) -> None:
        if self.by_handle.pop(held.handle, None) is None:
            return
        self._held.pop(held.key, None)
        log.info("%s: no worker holds it: releasing it once drained", held.batcher.label)
        task = asyncio.get_running_loop().create_task(held.batcher.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, timeout_s: float) -> None:
        for held in list(self.by_handle.values()):
            self._retire(held)
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=timeout_s)


class Session:
    """One worker's connection: a thread reading its descriptors and queueing them."""

    def __init__(
        self,
        ident: int,
        sock: socket.socket,
        host: EngineHost,
        loop: asyncio.AbstractEventLoop,
        sessions: set[Session],
    ) -> None:
        self._sessions = sessions
        self.ident = ident
        self.channel = Channel(sock)
        self.host = host
        self.loop = loop
        self.arena: Arena | None = None
        self.worker = -1
        self._inside = host.metrics.engine_requests.labels(host.device)
        self.thread = threading.Thread(
            target=self._run, name=f"torchwire-engine-session-{ident}", daemon=True
        )

    def _run(self) -> None:
        try:
            hello, fds = self.channel.receive_fds()
            if hello[0] != "hello" or len(fds) != 1:
                raise ValueError(
                    f"a worker's first message is hello with its arena, not {hello[0]!r}"
                )
            self.worker, self.arena = hello[1], Arena.attach(fds[0])
            self.channel.send(("hello", os.getpid()))
            load = ThreadLoad()
            while True:
                touched: dict[int, Batcher] = {}
                for message in self.channel.receive():
                    kind = message[0]
                    if kind == "infer":
                        self._infer(message, touched)
                    elif kind == "load":
                        self._hold(message)
                    elif kind == "release":
                        self.loop.call_soon_threadsafe(self.host.release, self.ident, message[1])
                    else:
                        raise ValueError(f"unknown message {kind!r}")
                for batcher in touched.values():
                    batcher.dispatch(load)
        except (EOFError, OSError) as exc:
            log.info("worker %d left the engine: %s", self.worker, exc)
        except Exception as exc:  # a bug of ours: this worker reconnects, the others go on
            report_bug(log, f"engine session of worker {self.worker} failed", exc)
        finally:
            self.channel.close()
            if self.arena is not None:  # unmapped once the last request's arrays are gone
                self.arena.close()
            self._sessions.discard(self)
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.host.session_ended, self.ident)

    def _hold(self, message: Message) -> None:
        _, rid, name, version, path, config, stamps = message

        async def hold() -> None:
            try:
                held = await self.host.hold(self.ident, name, version, path, config, stamps)
            except TorchwireError as exc:
                self._send(("failed", rid, exc.code, str(exc)))
                return
            except Exception as exc:
                bug = report_bug(log, f"loading {name} version {version}", exc)
                self._send(("failed", rid, bug.code, str(bug)))
                return
            model = held.batcher.model  # as the engine runs it: its outputs, its instances
            runs = model.config.model_copy(update={"outputs": model.outputs})
            self._send(("loaded", rid, held.handle, runs, held.batcher.cost, os.getpid()))

        asyncio.run_coroutine_threadsafe(hold(), self.loop)

    def _infer(self, message: Message, touched: dict[int, Batcher]) -> None:
        _, rid, handle, items, deadline, inputs, out_offset, out_bytes = message
        received = time.perf_counter()
        held = self.host.by_handle.get(handle)
        if held is None:
            self._send(("err", rid, "UNAVAILABLE", "the engine no longer holds this model "
                        "version (it was reloaded or unloaded); retry", {}))  # fmt: skip
            return
        arena = self.arena
        assert arena is not None
        arrays = [get_tensor(arena, tensor) for tensor in inputs]
        batcher = held.batcher

        def done(outcome: Arrays | TorchwireError) -> None:
            self._answer(rid, outcome, out_offset, out_bytes, received, batcher)

        self._inside.inc()
        try:
            batcher.enqueue(arrays, items, deadline, done)
        except TorchwireError as exc:
            done(exc)
            return
        touched[id(batcher)] = batcher

    def _answer(
        self,
        rid: int,
        outcome: Arrays | TorchwireError,
        at: int,
        room: int,
        received: float,
        batcher: Batcher,
    ) -> None:
        """On the thread that computed it: the answer into the worker's arena, then its
        descriptor."""
        self._inside.dec()
        if isinstance(outcome, TorchwireError):
            self._send(("err", rid, outcome.code, str(outcome), outcome.metadata))
            return
        arena, end = self.arena, at + room
        tensors = []
        try:
            for array in outcome:
                size = aligned(array.nbytes)
                fits = at >= 0 and at + size <= end
                tensors.append(put_tensor(arena if fits else None, array, at if fits else -1))
                if fits:
                    at += size
        except ValueError:  # the arena is unmapped: the worker left, nobody waits for this
            return
        queued = batcher.queued_items
        self._send(("ok", rid, tensors, time.perf_counter() - received, queued))

    def _send(self, message: Message) -> None:
        with contextlib.suppress(OSError):  # the worker is gone: its reader ended the session
            self.channel.send(message)


async def serve_engine(spec: EngineSpec) -> int:
    """Serve workers until SIGTERM, SIGINT, the supervisor's going away, or a failed device."""
    loop = asyncio.get_running_loop()
    settings = spec.settings
    metrics = Metrics(False, engine=spec.device)
    host = EngineHost(spec.device, settings.torch_threads, metrics, settings.worker_count())
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec.socket)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(spec.socket)
    listener.listen(256)
    sessions: set[Session] = set()

    def accept() -> None:
        for ident in itertools.count(1):
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed: the engine stops
            session = Session(ident, sock, host, loop, sessions)
            sessions.add(session)
            session.thread.start()

    threading.Thread(target=accept, name="torchwire-engine-accept", daemon=True).start()

    async def on_message(message: dict[str, Any]) -> None:
        raise TorchwireError(
            f"an engine takes no orders on its link: {message!r}", "INVALID_ARGUMENT"
        )

    async def report_gpus() -> None:  # the workers never touch the device: the gauges are here
        while True:
            observe_gpus(host.metrics, await asyncio.to_thread(read_gpus))
            await asyncio.sleep(settings.watchdog_interval_s)

    gauges = asyncio.create_task(report_gpus()) if settings.watchdog_interval_s > 0 else None
    link = await Link.open(socket.socket(fileno=spec.link_fd), on_message)
    await link.notify(to_message(Ready()))
    log.info("engine of %s (pid %d) ready on %s", spec.device, os.getpid(), spec.socket)
    waits = [asyncio.create_task(e.wait()) for e in (stop, link.closed, host.device_failed)]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in (*waits, gauges):
        if task is not None:
            task.cancel()
    listener.close()
    if host.device_failed.is_set():
        return DEVICE_FAILED
    log.info("engine of %s stopping", spec.device)
    for session in list(sessions):
        session.channel.close()
    await host.close(settings.grace_period_s)
    await link.close()
    return 0


def main() -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    spec = EngineSpec.from_env()
    settings = spec.settings
    configure_logging(settings.log_level, settings.log_format, worker=f"engine {spec.device}")
    tune_malloc(settings.malloc_arenas, settings.malloc_keep_mb)
    from torchwire.server.process.lifecycle import run_in_loop

    return run_in_loop(settings, lambda: serve_engine(spec))


if __name__ == "__main__":
    raise SystemExit(main())
