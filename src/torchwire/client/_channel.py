"""Channels as the clients open them: retries, keepalive, TLS, one connection per channel."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc

from torchwire.client import _v2 as v2
from torchwire.client._seed import (
    PREDICT,
    PREDICT_STREAM,
    NDArray,
    decode_response,
    encode_request,
    items_of,
    spread,
)

SEED_SERVICE = "ModelService"
V2_SERVICE = "inference.GRPCInferenceService"


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


RETRY_TOKENS = 10
"""gRPC retry throttling (gRFC A6): each failed attempt costs a token, each success gives back a
tenth, and retries stop while half or fewer are left; so under a lasting overload a client
retries about once per ten successes, never multiplying the load it was refused for."""


def service_config(retries: int) -> str:
    """Retry UNAVAILABLE (server restarting, connection refused) and RESOURCE_EXHAUSTED (a full
    queue) with exponential backoff, after the server's ``grpc-retry-pushback-ms`` when it sends
    one (the queue's drain estimate; ``-1``, never, for a request too big for memory), under
    retry throttling."""
    if retries <= 0:
        return json.dumps({})
    policy = {
        "maxAttempts": min(5, retries + 1),  # gRPC caps attempts at 5
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    services = [{"service": SEED_SERVICE}, {"service": V2_SERVICE}]
    return json.dumps(
        {
            "methodConfig": [{"name": services, "retryPolicy": policy}],
            "retryThrottling": {"maxTokens": RETRY_TOKENS, "tokenRatio": 0.1},
        }
    )


HEDGE_RATIO = 0.1
"""Each call earns this much of a hedge, and each hedge spends one: hedged calls stay under a
tenth of all calls (after the first ``HEDGE_BURST``), however slow the servers get, so that a
slow fleet is never sent its load twice."""
HEDGE_BURST = 10.0
"""Hedges a client may send before its calls have earned any (and the most it saves up)."""
NON_FATAL = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Statuses of one attempt of a hedged call after which the other attempt is awaited (gRFC A6's
non-fatal codes); any other ends the call at once."""


def hedge_channels(targets: Sequence[str]) -> list[int]:
    """For each channel (by its target), the channel its hedges go to: the next one to another
    target, else the next one (another connection to the same target)."""
    count = len(targets)
    return [
        next(
            (j % count for j in range(i + 1, i + count) if targets[j % count] != targets[i]),
            (i + 1) % count,
        )
        for i in range(count)
    ]


class HedgeBudget:
    """How many calls may be sent a second time (``HEDGE_RATIO``, ``HEDGE_BURST``)."""

    def __init__(self) -> None:
        self._tokens = HEDGE_BURST
        self._lock = threading.Lock()  # a blocking client may be shared by threads
        self.hedged = 0

    def earn(self) -> None:
        with self._lock:
            self._tokens = min(HEDGE_BURST, self._tokens + HEDGE_RATIO)

    def spend(self) -> bool:
        """Take one hedge if the budget has it."""
        with self._lock:
            if self._tokens < 1:
                return False
            self._tokens -= 1
            self.hedged += 1
            return True


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


class ClientBase:
    """What ``AsyncClient`` and ``Client`` share: arguments, the channel pool, the turn.

    Args:
        targets: ``host:port`` or a list of them; channels are spread over the targets.
        pool_size: channels (each its own connection).
        timeout: default deadline of each call, in seconds.
        protocol: ``"seed"`` (the founding ``ModelService``) or ``"v2"`` (KServe V2 ModelInfer;
            the first input and output of the model).
        raw: send floats as one ``raw_inputs`` buffer (fast) instead of ``repeated float``.
        retries: retries of UNAVAILABLE with exponential backoff (0: none).
        keepalive_s: HTTP/2 keepalive ping interval while calls are active (0: off).
        tls: TLS settings; ``None`` for plaintext.
        token: sent as ``authorization: Bearer <token>`` on every call (a server started with
            ``--auth-token-file``); ``None``: the ``TORCHWIRE_TOKEN`` environment variable, if
            set.
        hedge_after: seconds after which a ``predict`` still unanswered is sent again on
            another channel (the next one to another target when there are several, else the
            next connection: another worker or replica); the first answer wins, the other is
            cancelled. Hedged calls stay under ``HEDGE_RATIO`` of all calls (``hedged`` counts
            them); none is sent once the call's deadline has passed. Set it a little above the
            calls' usual P99: it cuts the tail that one slow server makes. The blocking client
            then waits on a future (a little more CPU per call), the async one
            on a timer. ``None`` (default): never. Streams are never hedged, nor is anything
            with a pool of one channel (a hedge would reach the same server as its call).

    Raises (from each call): ``InvalidInputError``, ``ModelNotFoundError``, ``QueueFullError``,
    ``DeadlineExceededError``, ``UnavailableError``, ``ModelExecutionError``, or
    ``TorchwireError`` for other statuses, each with ``code`` set to the status name.
    """

    _grpc: Any = grpc  # the module whose channels the subclass uses (grpc or grpc.aio)

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        pool_size: int = 4,
        timeout: float | None = 1.0,
        protocol: Literal["seed", "v2"] = "seed",
        raw: bool = True,
        retries: int = 3,
        keepalive_s: float = 30.0,
        tls: TLS | None = None,
        token: str | None = None,
        hedge_after: float | None = None,
    ) -> None:
        if protocol not in ("seed", "v2"):
            raise ValueError(f"protocol must be 'seed' or 'v2', got {protocol!r}")
        if hedge_after is not None and hedge_after < 0:
            raise ValueError(f"hedge_after is in seconds, >= 0 or None; got {hedge_after!r}")
        self.hedge_after = hedge_after
        self._hedges = HedgeBudget()
        self.protocol = protocol
        token = token if token is not None else os.environ.get("TORCHWIRE_TOKEN")
        self._auth = (("authorization", f"Bearer {token}"),) if token else None
        self._specs: dict[tuple[str, str], v2.Spec] = {}
        options = channel_options(retries, keepalive_s, tls)
        self.timeout = timeout
        self.raw = raw
        spread_targets = spread(targets, pool_size)
        self._channels = [
            self._grpc.secure_channel(t, tls.credentials(), options)
            if tls
            else self._grpc.insecure_channel(t, options)
            for t in spread_targets
        ]
        self._hedge_to = hedge_channels(spread_targets)
        if len(self._channels) == 1:
            self.hedge_after = None
        unary, stream = (PREDICT, PREDICT_STREAM) if protocol == "seed" else (v2.INFER, v2.STREAM)
        self._predict = [ch.unary_unary(unary) for ch in self._channels]
        self._streams = [ch.stream_stream(stream) for ch in self._channels]
        self._metadata = [ch.unary_unary(v2.METADATA) for ch in self._channels]
        self._turn = itertools.count()

    def _next(self) -> int:
        """The index of the next channel, round-robin."""
        return next(self._turn) % len(self._channels)

    @property
    def hedged(self) -> int:
        """Calls sent a second time so far (``hedge_after``)."""
        return self._hedges.hedged

    def _encode(self, model: str, array: NDArray, version: int | str | None) -> bytes:
        if self.protocol == "seed":
            return encode_request(model, array, version, self.raw)
        return v2.encode_infer(model, array, version, self._specs[(model, str(version or ""))])

    def _decode(self, data: bytes, array: NDArray, stream: bool = False) -> NDArray:
        if self.protocol == "seed":
            return decode_response(data, items_of(array))
        return v2.decode_stream(data) if stream else v2.decode_infer(data)

    def _needs_spec(self, model: str, version: int | str | None, asked: bool = False) -> bool:
        """Whether to fetch the model's V2 metadata: a V2 call needs it, and ``spec()`` asks
        for it whatever the protocol (torchwire serves both on one port)."""
        return (asked or self.protocol == "v2") and (model, str(version or "")) not in self._specs

    def _keep_spec(self, model: str, version: int | str | None, data: bytes) -> v2.Spec:
        spec = self._specs[(model, str(version or ""))] = v2.parse_metadata(data)
        return spec
