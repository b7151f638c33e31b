"""Per-request accounting: metrics and the access log, in one place for every API.

A ``Call`` starts when a request arrives, learns its model once the repository resolved it, and
finishes when its answer is ready (or it failed), with the status code its outcome maps to.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from torchwire.errors import TorchwireError
from torchwire.metrics import Metrics
from torchwire.runtime import Batcher
from torchwire.server.common.status import status_code

access_log = logging.getLogger("torchwire.access")
REQUEST_ID_MAX = 128
"""Longest x-request-id kept in the access log; longer ones are cut."""


def outcome_code(exc: BaseException | None) -> grpc.StatusCode:
    """The status code a request ends with, given what (if anything) it raised."""
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, TorchwireError):
        return status_code(exc)
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


class _Children:
    """The metric children one (model version, API) pair of requests counts into, looked up
    once: they are on every request's path."""

    __slots__ = ("_observer", "_requests", "api", "duration", "inflight", "model", "version")

    def __init__(self, observer: Observer, model: str, version: str, api: str) -> None:
        metrics = observer.metrics
        self._observer, self.model, self.version, self.api = observer, model, version, api
        self.inflight = observer.child(metrics.inflight, model)
        self.duration = observer.child(metrics.request_duration, model, api)
        self._requests: dict[str, Any] = {}

    def requests(self, code: grpc.StatusCode) -> Any:
        found = self._requests.get(code.name)
        if found is None:
            metrics = self._observer.metrics
            found = self._requests[code.name] = self._observer.child(
                metrics.requests, self.model, self.version, self.api, code.name
            )
        return found


class Call:
    """One request being served; use as a context manager or call ``finish`` yourself."""

    __slots__ = (
        "_children", "_finished", "_observer", "_peer", "_request_id", "api", "items", "model",
        "started", "version",
    )  # fmt: skip

    def __init__(self, observer: Observer, api: str, origin: Callable[[], tuple[str, str]]) -> None:
        self._observer = observer
        self.api = api
        self.started = time.perf_counter()
        self.model = ""
        self.version = ""
        self.items = 0
        self._children: _Children | None = None
        self._finished = False
        self._peer: str | None = None
        self._request_id: str | None = None
        if observer.access_log:
            self._peer, given = origin()
            # One access-log line per request: no CR/LF (or other control characters) from the
            # client, and a bounded length.
            clean = "".join(c for c in given[:REQUEST_ID_MAX] if c.isprintable())
            self._request_id = clean or uuid.uuid4().hex[:16]

    def target(self, batcher: Batcher) -> None:
        """The request was resolved to this model version (again: it moves there)."""
        if self._children is not None:
            self._children.inflight.dec()
        children = self._children = self._observer.children(batcher, self.api)
        self.model, self.version = children.model, children.version
        children.inflight.inc()

    def finish(self, exc: BaseException | None = None) -> float:
        """Count the request with the code its outcome maps to; return its duration (s). Only
        the first call counts: a stream's clean-up may finish what was finished already."""
        elapsed = time.perf_counter() - self.started
        if self._finished:
            return elapsed
        self._finished = True
        code = outcome_code(exc)
        children = self._children
        if children is None:  # refused before its model was known
            metrics = self._observer.metrics
            self._observer.child(metrics.requests, "", "", self.api, code.name).inc()
        else:
            children.requests(code).inc()
            children.inflight.dec()
            children.duration.observe(elapsed)
        if self._observer.access_log:
            self._log(code, elapsed)
        return elapsed

    def _log(self, code: grpc.StatusCode, elapsed: float) -> None:
        fields: dict[str, Any] = {
            "peer": self._peer,
            "api": self.api,
            "model": self.model,
            "version": self.version,
            "items": self.items,
            "code": code.name,
            "duration_ms": round(elapsed * 1e3, 3),
            "request_id": self._request_id,
        }
        access_log.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)

    def __enter__(self) -> Call:
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        self.finish(exc)


class Observer:
    """Starts a ``Call`` per request; owns the metrics and the access-log switch."""

    def __init__(self, metrics: Metrics, access_log: bool = False) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self._children: dict[tuple[Any, ...], Any] = {}
        self._by_target: dict[tuple[str, str], _Children] = {}

    def children(self, batcher: Batcher, api: str) -> _Children:
        """The metric children of ``api`` requests to ``batcher``'s model version."""
        found = self._by_target.get((batcher.label, api))
        if found is None:
            found = _Children(self, batcher.name, str(batcher.version), api)
            self._by_target[(batcher.label, api)] = found
        return found

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: it is on every request's path."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def call(self, api: str, context: grpc.aio.ServicerContext) -> Call:
        """A gRPC call: its peer and ``x-request-id`` metadata (read only for the access log)."""

        def origin() -> tuple[str, str]:
            metadata = dict(context.invocation_metadata() or ())
            return context.peer(), metadata.get("x-request-id") or ""

        return Call(self, api, origin)

    def http_call(self, api: str, peer: str | None, headers: Mapping[str, str]) -> Call:
        """An HTTP request: its peer and ``X-Request-Id`` header."""
        return Call(self, api, lambda: (peer or "", headers.get("x-request-id") or ""))
