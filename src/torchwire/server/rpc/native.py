"""The native gRPC front end (``--grpc-frontend native``): HTTP/2 and gRPC in Rust, outside the GIL.

pygrpc-native's ``NativeGrpcFront`` owns the port. It serves the calls that carry the load, the
seed ``Predict`` and V2 ``ModelInfer``, by handing them to Python in batches: one thread here
takes each batch and, through the data plane, admits, decodes and queues each call, without the
event loop; answers leave with ``respond``/``fail`` from the thread that computed them. Every other
method (streams, health, reflection, model control) goes through to torchwire's grpc.aio server
on a Unix socket behind it (``set_fallback``): clients see one port.

Stopping: new calls are refused UNAVAILABLE (never run, so safe to retry elsewhere), the calls
already taken are answered and their answers written, and only then is the front closed
(GOAWAY): closing it first would fail them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Sequence
from importlib import metadata as package_metadata
from typing import Any

import grpc

from torchwire.config import ServerSettings, available_cores
from torchwire.errors import TorchwireError, UnavailableError, report_bug
from torchwire.runtime import Batcher, ThreadLoad, Ticket
from torchwire.runtime.arrays import Arrays
from torchwire.server.codecs.v2_codec import parse_infer
from torchwire.server.common.auth import Access
from torchwire.server.common.observe import Call, Observer
from torchwire.server.common.status import status_code
from torchwire.server.plane.inference import DataPlane, SeedInference, V2Inference

pygrpc_native: Any
try:
    import pygrpc_native
except ImportError:  # no wheel for this platform: the grpc.aio front end serves alone
    pygrpc_native = None

log = logging.getLogger(__name__)

LIBRARY = "pygrpc-native"
SEED_PREDICT = "/ModelService/Predict"
V2_INFER = "/inference.GRPCInferenceService/ModelInfer"
METHODS = [(SEED_PREDICT, False), (V2_INFER, False)]
"""Served natively, in this order: an event's method id is the index here."""
_SEED, _V2 = 0, 1
BATCH_EVENTS = 256
"""Most calls taken from the front in one trip across the GIL."""
FLUSH_POLL_S = 0.005
"""While stopping, how often to look whether the last answers have been written."""
KEEPALIVE_MS = 60_000
"""Ping a connection quiet this long; one that does not answer within KEEPALIVE_TIMEOUT_MS is
closed, so a peer that vanished frees its socket and its streams."""
KEEPALIVE_TIMEOUT_MS = 20_000
SECOND_IO_THREAD_CORES = 8
"""A process with at least this many cores (its share under ``--workers``) gets two HTTP/2
threads unless ``--grpc-io-threads`` says; below, one."""


def unavailable_because(settings: ServerSettings) -> str | None:
    """Why the native front end cannot serve ``settings``, or None if it can."""
    if pygrpc_native is None:
        return f"{LIBRARY} is not installed (no wheel for this platform?)"
    if settings.tls_cert:
        return f"TLS (--tls-cert) is served by grpc.aio only; {LIBRARY} has no TLS"
    if settings.max_connection_age_s:
        return (
            f"--max-connection-age-s is served by grpc.aio only; {LIBRARY} cannot age connections"
        )
    if settings.max_connections:
        return f"--max-connections is served by grpc.aio only; {LIBRARY} cannot cap connections"
    idle_default = type(settings).model_fields["connection_idle_s"].default
    if settings.connection_idle_s not in (0, idle_default):
        return (
            f"--connection-idle-s is served by grpc.aio only; {LIBRARY} closes dead connections "
            "by keepalive, not idle ones"
        )
    return None


def io_threads(settings: ServerSettings, cores: int) -> int:
    """The HTTP/2 threads of a process with ``cores`` (0: the machine's available cores)."""
    if settings.grpc_io_threads:
        return settings.grpc_io_threads
    return 2 if (cores or available_cores()) >= SECOND_IO_THREAD_CORES else 1


def version() -> str:
    return package_metadata.version(LIBRARY)


class NativeFront:
    """The native front end over the data plane, with ``fallback`` (a Unix socket path of a
    grpc.aio server) for every method it does not serve.

    Calls never touch the event loop: the receiving thread admits, decodes and queues a batch
    of calls, then runs it itself when the model is cheap and the thread is not busy
    (``Batcher.dispatch``), else an inference thread does; the answer leaves from the thread that
    computed it.

    Args:
        reuse_port: share the port with other processes (``--workers``).
        cores: this process's share of the cores (0: all), for its HTTP/2 threads.
    """

    def __init__(
        self,
        settings: ServerSettings,
        plane: DataPlane,
        observer: Observer,
        access: Access,
        reuse_port: bool,
        cores: int = 0,
    ) -> None:
        assert pygrpc_native is not None
        self._plane = plane
        self._observer = observer
        self._access = access
        self._max_bytes = settings.max_message_bytes
        self.io_threads = io_threads(settings, cores)
        self._front = pygrpc_native.NativeGrpcFront(
            f"{settings.host}:{settings.port}",
            METHODS,
            io_threads=self.io_threads,
            call_details=True,
            keepalive_time_ms=KEEPALIVE_MS,
            keepalive_timeout_ms=KEEPALIVE_TIMEOUT_MS,
            max_concurrent_streams=settings.max_streams_per_connection,
            reuse_port=reuse_port,
            metrics=True,  # calls finished on the wire: what a stop waits for (``_flushed``)
        )
        # Calls queued and not yet answered: the receiving thread adds, any thread removes.
        self._calls: dict[int, tuple[Call, Ticket | None]] = {}
        self._lock = threading.Lock()
        self._draining = False
        self._drained = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, fallback: str) -> int:
        """Bind, take calls, and return the port."""
        self._front.set_fallback(fallback)
        self._front.start()
        self._thread = threading.Thread(target=self._receive, name="torchwire-native", daemon=True)
        self._thread.start()
        return int(self._front.bound_port)

    def _receive(self) -> None:
        """Take each batch of events until the front is closed; queue its calls, then dispatch
        each model's queue once."""
        load = ThreadLoad()
        try:
            while (events := self._front.recv_batch_details(BATCH_EVENTS)) is not None:
                queued: dict[int, Batcher] = {}
                for kind, call_id, method_id, payload, _, details in events:
                    if kind == pygrpc_native.EVENT_CALL:
                        batcher = self._begin(call_id, method_id, payload, details)
                        if batcher is not None:
                            queued[id(batcher)] = batcher
                    else:  # the client went away or its deadline passed
                        self._cancel(call_id)
                for batcher in queued.values():
                    batcher.dispatch(load)
        finally:
            load.close()

    def _begin(self, call_id: int, method_id: int, payload: bytes, details: Any) -> Batcher | None:
        """Admit, decode and queue one call (or answer its error); return its model's batcher."""
        metadata, peer, remaining = details
        api = "seed" if method_id == _SEED else "v2"
        call = Call(self._observer, api, functools.partial(_origin, peer, metadata))
        try:
            if self._draining:
                raise UnavailableError("the server is shutting down; retry (another replica)")
            if self._access.tokens is not None:
                self._access.check_call(_value(metadata, "authorization"), "grpc")
            if len(payload) > self._max_bytes:
                raise TorchwireError(
                    f"the request is {len(payload)} bytes, more than this server accepts "
                    f"(--max-message-bytes {self._max_bytes})",
                    code="RESOURCE_EXHAUSTED",
                )
            deadline = None if remaining is None else time.monotonic() + remaining
            inference: SeedInference | V2Inference
            if method_id == _SEED:
                inference = self._plane.seed(payload, call, deadline)
            else:
                inference = self._plane.v2(parse_infer(payload), call, deadline)
            with self._lock:
                self._calls[call_id] = (call, None)
            ticket = inference.enqueue(functools.partial(self._answer, call_id, inference))
        except Exception as exc:
            self._forget(call_id)
            self._fail(call_id, call, exc)
            return None
        with self._lock:  # unless an inference thread answered it already
            if call_id in self._calls:
                self._calls[call_id] = (call, ticket)
        return inference.batcher

    def _answer(
        self, call_id: int, inference: SeedInference | V2Inference, outcome: Arrays | Exception
    ) -> None:
        """On the thread that computed it: send the answer, or the error."""
        self._forget(call_id)
        call = inference.call
        if isinstance(outcome, Exception):
            self._fail(call_id, call, outcome)
            return
        try:
            encoded = inference.encode(outcome)
            body = encoded if isinstance(encoded, bytes) else b"".join(encoded)
            if len(body) > self._max_bytes:
                raise TorchwireError(
                    f"the answer is {len(body)} bytes, more than this server sends "
                    f"(--max-message-bytes {self._max_bytes}): ask for fewer items",
                    code="RESOURCE_EXHAUSTED",
                )
        except Exception as exc:
            self._fail(call_id, call, exc)
            return
        self._front.respond(call_id, body)
        call.finish()

    def _cancel(self, call_id: int) -> None:
        with self._lock:
            found = self._calls.pop(call_id, None)
        if found is not None:
            call, ticket = found
            if ticket is not None:
                ticket.cancel()  # not computed if it is still queued
            call.finish(asyncio.CancelledError())
            self._check_drained()

    def _forget(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)
        self._check_drained()

    def _check_drained(self) -> None:
        if self._draining and not self._calls:
            self._drained.set()

    def _fail(self, call_id: int, call: Call, exc: BaseException) -> None:
        """End the call with the status ``exc`` maps to (a bug: INTERNAL, logged)."""
        call.finish(exc)
        if isinstance(exc, TorchwireError):
            # pygrpc-native refuses to send reserved grpc-* keys (grpc-retry-pushback-ms):
            # torchwire-retry-after-ms carries the same hint.
            trailing = [(k, v) for k, v in exc.metadata.items() if not k.startswith("grpc-")]
            self._front.fail(call_id, status_code(exc).value[0], str(exc), trailing or None)
            return
        bug = report_bug(log, "unexpected error serving a native call", exc)
        self._front.fail(call_id, grpc.StatusCode.INTERNAL.value[0], str(bug))

    async def drain(self, grace_s: float) -> bool:
        """Refuse new calls and wait up to ``grace_s`` for those taken to be answered and their
        answers written; return whether they all were."""
        deadline = time.monotonic() + grace_s
        self._draining = True
        self._drained.clear()
        if self._calls:
            log.info("native front end: answering the %d calls it has taken", len(self._calls))
            if not await asyncio.to_thread(self._drained.wait, grace_s):
                log.warning("%d native calls unanswered after the grace period", len(self._calls))
                return False
        # respond() only queues an answer: closing before it is written would lose it.
        started, _ = self._counts()
        while self._counts()[1] < started:
            if time.monotonic() >= deadline:
                log.warning("native front end: answers still being written after the grace period")
                return False
            await asyncio.sleep(FLUSH_POLL_S)
        return True

    def _counts(self) -> tuple[int, int]:
        """Calls to the natively served methods started, and finished on the wire, so far."""
        started = finished = 0
        methods = (self._front.metrics() or {}).get("methods", {})
        for path, _ in METHODS:
            method = methods.get(path, {})
            started += method.get("started", 0)
            finished += sum(status.get("count", 0) for status in method.get("status", {}).values())
        return started, finished

    async def close(self) -> None:
        """Close the port and every connection (GOAWAY); calls still open fail UNAVAILABLE."""
        with self._lock:
            left = list(self._calls.values())
        for _, ticket in left:
            if ticket is not None:
                ticket.cancel()
        self._front.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)


def _value(metadata: Sequence[tuple[str, str | bytes]], key: str) -> str | None:
    for name, value in metadata:
        if name == key:
            return value if isinstance(value, str) else None
    return None


def _origin(peer: str, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str, str]:
    """The peer and ``x-request-id`` of a call, for the access log."""
    return peer, _value(metadata, "x-request-id") or ""
