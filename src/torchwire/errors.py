"""torchwire's exceptions: one tree, mapped to gRPC status codes in one place (``STATUS_NAMES``).

The server raises them and sends their status (over HTTP, the status ``HTTP_STATUS`` maps it to);
the client raises the same classes for the status it receives, with ``code`` set to the status's
name. This module imports no gRPC::

    TorchwireError
    ├── InvalidInputError       INVALID_ARGUMENT   the request does not fit the model
    ├── ModelNotFoundError      NOT_FOUND          no such model or version
    ├── QueueFullError          RESOURCE_EXHAUSTED the model's queue is full; retry later
    ├── DeadlineExceededError   DEADLINE_EXCEEDED  the caller's deadline passed while queued
    ├── UnavailableError        UNAVAILABLE        the server or model version is shutting down
    ├── UnauthenticatedError    UNAUTHENTICATED    no valid bearer token (--auth-token-file)
    ├── PermissionDeniedError   PERMISSION_DENIED  repository control not allowed (--model-control)
    ├── ModelExecutionError     INTERNAL           the model raised; its message is passed on
    │   ├── ModelOutOfMemoryError RESOURCE_EXHAUSTED the request does not fit in memory alone
    │   └── DeviceFailedError   INTERNAL           the GPU failed for good (the process restarts)
    └── ConfigError             (start-up)         a config file, flag or model file is wrong

Unexpected exceptions (bugs) are sent as INTERNAL with a generic message and an error id, and
logged in full under that id (``report_bug``). A status with no class of its own (CANCELLED,
UNKNOWN, ...) reaches a client as ``TorchwireError``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator


class TorchwireError(Exception):
    """Base class of every error torchwire raises on purpose.

    Attributes:
        code: the gRPC status name (e.g. ``"NOT_FOUND"``) this error travels as.
        metadata: machine-readable facts sent along as trailing metadata (e.g. the item shape a
            model expects, under ``torchwire-item-shape``).
    """

    code: str = "INTERNAL"

    def __init__(
        self, message: str, code: str | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.metadata = metadata or {}


class InvalidInputError(TorchwireError):
    """The request's inputs do not match what the model expects."""

    code = "INVALID_ARGUMENT"


class ModelNotFoundError(TorchwireError):
    """The requested model or version is not served."""

    code = "NOT_FOUND"


class QueueFullError(TorchwireError):
    """The model's request queue is full."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(TorchwireError):
    """The caller's deadline passed before the request was computed."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(TorchwireError):
    """The server or the model version is shutting down."""

    code = "UNAVAILABLE"


class VersionClosedError(UnavailableError):
    """The model version a request was found for closed before the request was queued: a reload
    retired it meanwhile (or the server is stopping). The data plane finds the request's version
    once more before it answers this."""


class UnauthenticatedError(TorchwireError):
    """The call carries no valid ``authorization: Bearer <token>``."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(TorchwireError):
    """The caller may not do this (loading or unloading models, under ``--model-control``)."""

    code = "PERMISSION_DENIED"


class ModelExecutionError(TorchwireError):
    """The model raised while computing; the message is the model's own."""

    code = "INTERNAL"


class ModelOutOfMemoryError(ModelExecutionError):
    """The model ran out of (GPU or host) memory. The batcher splits a batch that does; a
    request that does not fit even alone fails with this, saying what it asked for and what
    is free. A client receives it as ``QueueFullError`` (the same status)."""

    code = "RESOURCE_EXHAUSTED"


class DeviceFailedError(ModelExecutionError):
    """The model's device failed for the rest of this process: a CUDA error that sticks (a
    device-side assert, an illegal address) after which every call fails. The requests of the
    batch it failed on get it (INTERNAL, not retried: one of them may have caused it); the
    model's other requests get ``UnavailableError`` (retried), and the process stops with exit
    code ``DEVICE_FAILED`` to be started again (by the supervisor of ``--workers``, or
    Kubernetes) with a working device.

    Attributes:
        seen_before: the device was found failed before this call failed (by another batch,
            maybe of another model on it): this call's requests did not cause it.
    """

    def __init__(self, message: str, seen_before: bool = False) -> None:
        super().__init__(message)
        self.seen_before = seen_before


def report_bug(logger: logging.Logger, what: str, exc: BaseException | None) -> TorchwireError:
    """A bug met while serving: logged with its traceback under a new error id; the error the
    caller gets says only that id (the exception's text may hold anything)."""
    error_id = secrets.token_hex(6)
    logger.error("%s (error id %s)", what, error_id, exc_info=exc)
    return TorchwireError(
        f"internal server error (error id {error_id}: the server log has the details)",
        code="INTERNAL",
    )


class ConfigError(TorchwireError):
    """A configuration file, a flag or a model file is invalid."""

    code = "FAILED_PRECONDITION"


RETRY_AFTER_METADATA = "torchwire-retry-after-ms"
"""Trailing metadata of a refusal for load (RESOURCE_EXHAUSTED): milliseconds after which the
same request can expect to be taken, as the server estimates it."""
RETRY_PUSHBACK_METADATA = "grpc-retry-pushback-ms"
"""gRPC's own retry hint (gRFC A6), sent beside ``RETRY_AFTER_METADATA``: a client whose retry
policy covers the status waits that long before its retry; ``-1`` tells it not to retry (a
request too big for memory will not fit next time either)."""
START_FAILED = 2
"""Exit code of a server (or worker) that could not start: a bad flag, model file or port.
Retrying will not help, so a supervisor gives up on it."""
ABANDONED_CALLS = 3
"""Exit code of a server that stopped while a model call still ran (a hung model)."""
DEVICE_FAILED = 4
"""Exit code of a server that stopped because a model's device failed (``DeviceFailedError``)."""

ITEM_SHAPE_METADATA = "torchwire-item-shape"
"""Trailing metadata of a wrong-length seed request: the model's per-item input shape, so that a
client can discover it with an empty request (the seed API has no metadata RPC)."""

_CLASSES: tuple[type[TorchwireError], ...] = (  # for a shared status, the last is the client's
    InvalidInputError,
    ModelNotFoundError,
    ModelOutOfMemoryError,
    QueueFullError,
    DeadlineExceededError,
    UnavailableError,
    UnauthenticatedError,
    PermissionDeniedError,
    ModelExecutionError,
)
STATUS_NAMES: dict[type[TorchwireError], str] = {cls: cls.code for cls in _CLASSES}
"""Each error class and the gRPC status it travels as."""
ERRORS_BY_STATUS: dict[str, type[TorchwireError]] = {
    code: cls for cls, code in STATUS_NAMES.items()
}
"""The class a client raises for a status name (others: ``TorchwireError``)."""


HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
}
"""The HTTP status each gRPC status name travels as on the REST API (others: 500)."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during (``__cause__`` and
    ``__context__``, both followed), each once: a chain may loop."""
    waiting: list[BaseException | None] = [exc]
    done: set[int] = set()
    while waiting:
        seen = waiting.pop()
        if seen is None or id(seen) in done:
            continue
        done.add(id(seen))
        yield seen
        waiting += [seen.__cause__, seen.__context__]


def error_for_status(code: str, message: str) -> TorchwireError:
    """The exception a client raises for a failed call with status ``code``."""
    return ERRORS_BY_STATUS.get(code, TorchwireError)(message, code)
