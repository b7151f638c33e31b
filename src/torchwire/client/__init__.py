"""Clients of a torchwire server: ``AsyncClient`` (asyncio) and ``Client`` (blocking)."""

from torchwire.client._channel import TLS
from torchwire.client.aio import AsyncClient
from torchwire.client.sync import Client

__all__ = ["TLS", "AsyncClient", "Client"]
