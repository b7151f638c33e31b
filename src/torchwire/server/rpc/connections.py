"""What a client can hold on the server: connections, idle time, streams, handshake time.

Idle or abandoned connections would otherwise hold file descriptors forever and lock out new
clients and health checks; these gRPC options bound them (``torchwire serve --connection-idle-s``,
``--max-connections``, ``--max-streams-per-connection``, ``--max-connection-age-s``).
"""

from __future__ import annotations

import resource

from torchwire.config import ServerSettings

HANDSHAKE_TIMEOUT_MS = 10_000
"""A connection that has not completed its (TLS and) HTTP/2 handshake by then is closed."""
FD_RESERVE = 256
"""File descriptors kept for everything but client connections: models, logs, metrics."""


def connection_limits(settings: ServerSettings) -> list[tuple[str, int]]:
    """gRPC server options that bound what clients can hold: connections, idle time, streams."""
    options = [
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
    ]
    if settings.connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", int(settings.connection_idle_s * 1000)))
    if settings.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            # Calls under way when a connection reaches its age get the grace period to end.
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
        ]
    cap = settings.max_connections or _connections_allowed_by_fd_limit()
    if cap:
        options.append(("grpc.max_allowed_incoming_connections", cap))
    return options


def _connections_allowed_by_fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(16, soft - FD_RESERVE)
