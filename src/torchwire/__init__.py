"""torchwire: serve PyTorch models over gRPC from asyncio Python.

The client side is importable without torch: ``from torchwire import Client, AsyncClient``.
"""

from torchwire.client import TLS, AsyncClient, Client
from torchwire.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelExecutionError,
    ModelNotFoundError,
    QueueFullError,
    TorchwireError,
    UnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "TLS",
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "InvalidInputError",
    "ModelExecutionError",
    "ModelNotFoundError",
    "QueueFullError",
    "TorchwireError",
    "UnavailableError",
    "__version__",
]
