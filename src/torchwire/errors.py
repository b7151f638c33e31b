"""torchwire's exceptions: one tree, mapped to gRPC status codes in one place.

The mapping lives in ``torchwire.server.status`` (this module imports no gRPC)::

    TorchwireError
    ├── InvalidInputError       INVALID_ARGUMENT   the request does not fit the model
    ├── ModelNotFoundError      NOT_FOUND          no such model or version
    ├── QueueFullError          RESOURCE_EXHAUSTED the model's queue is full; retry later
    ├── DeadlineExceededError   DEADLINE_EXCEEDED  the caller's deadline passed while queued
    ├── UnavailableError        UNAVAILABLE        the server or model version is shutting down
    ├── ModelExecutionError     INTERNAL           the model raised; its message is passed on
    └── ConfigError             (start-up)         a config file, flag or model file is wrong

Unexpected exceptions (bugs) are sent as INTERNAL with a generic message and logged in full.
"""

from __future__ import annotations


class TorchwireError(Exception):
    """Base class of every error torchwire raises on purpose."""


class InvalidInputError(TorchwireError):
    """The request's inputs do not match what the model expects."""


class ModelNotFoundError(TorchwireError):
    """The requested model or version is not served."""


class QueueFullError(TorchwireError):
    """The model's request queue is full."""


class DeadlineExceededError(TorchwireError):
    """The caller's deadline passed before the request was computed."""


class UnavailableError(TorchwireError):
    """The server or the model version is shutting down."""


class ModelExecutionError(TorchwireError):
    """The model raised while computing; the message is the model's own."""


class ConfigError(TorchwireError):
    """A configuration file, a flag or a model file is invalid."""
