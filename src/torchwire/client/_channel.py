"""Channels as the clients open them: retries, keepalive, TLS, one connection per channel."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SEED_SERVICE = "ModelService"


@dataclass(frozen=True)
class TLS:
    """TLS for the client's channels.

    Args:
        root_certificates: PEM of the CAs to trust (default: the system's).
        private_key: PEM of the client key, for mutual TLS.
        certificate_chain: PEM of the client certificate, for mutual TLS.
        server_name: the name to check the server's certificate against, if not the target's host.
    """

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        key: str | Path | None = None,
        cert: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLS:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca), read(key), read(cert), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def service_config(retries: int) -> str:
    """Retry UNAVAILABLE (server restarting, connection refused) with exponential backoff."""
    if retries <= 0:
        return json.dumps({})
    policy = {
        "maxAttempts": min(5, retries + 1),  # gRPC caps attempts at 5
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps(
        {"methodConfig": [{"name": [{"service": SEED_SERVICE}], "retryPolicy": policy}]}
    )


def channel_options(retries: int, keepalive_s: float, tls: TLS | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        # Each channel of the pool gets its own connection (gRPC shares them by default).
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        ("grpc.service_config", service_config(retries)),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    if keepalive_s > 0:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options
