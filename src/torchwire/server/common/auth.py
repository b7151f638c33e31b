"""Who may call: bearer tokens (``--auth-token-file``) and repository control
(``--model-control off|open|token``, ``--admin-token-file``). One ``Access`` per server, asked
by the gRPC interceptor, the V2 servicer's load/unload and the HTTP front-end alike; it counts
every call it refuses, by API and reason (``torchwire_denied_requests_total``).

Tokens are compared in constant time, every token of the file each time (no early exit that
would tell a caller how close it came). A token file is re-read when it changes (checked at
most once a second); one that cannot be read then keeps the tokens it had, with a warning.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from torchwire.config import ServerSettings
from torchwire.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from torchwire.server.common.status import status_code

log = logging.getLogger(__name__)
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""gRPC methods answered without a token unless ``--auth-health``."""
RECHECK_S = 1.0


class TokenFile:
    """The tokens of one file: one a line; blank lines and '#' comments ignored."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._tokens: tuple[bytes, ...] = ()
        try:
            self._reload()
        except OSError as exc:
            raise ConfigError(f"{what} {path}: cannot read: {exc}") from None
        if not self._tokens:
            raise ConfigError(f"{what} {path} holds no token (one a line)")

    def _reload(self) -> None:
        stat = os.stat(self.path)
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return
        lines = self.path.read_text().splitlines()
        tokens = tuple(
            line.strip().encode() for line in lines if line.strip() and not line.startswith("#")
        )
        if self._stamp is not None:
            log.info("%s %s changed: %d tokens", self.what, self.path, len(tokens))
        self._tokens, self._stamp = tokens, stamp

    def accepts(self, token: str) -> bool:
        now = time.monotonic()
        if now - self._checked >= RECHECK_S:
            with self._lock:
                self._checked = now
                try:
                    self._reload()
                except OSError as exc:
                    log.warning("%s %s: %s; keeping its last tokens", self.what, self.path, exc)
        given = token.encode()
        found = False
        for known in self._tokens:
            found |= hmac.compare_digest(known, given)
        return found


def bearer(authorization: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value, if that is what it is."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Access:
    """The server's rules, from its settings; ``load`` reads the token files.

    Args:
        settings: the server's flags.
        on_denied: called with the API (``grpc``, ``v2_http``) and the reason (the status code in
            lower case, e.g. ``unauthenticated``) of every refusal.
    """

    def __init__(
        self, settings: ServerSettings, on_denied: Callable[[str, str], None] | None = None
    ) -> None:
        self._settings = settings
        self._on_denied = on_denied or (lambda api, reason: None)
        self.tokens: TokenFile | None = None
        self.admin: TokenFile | None = None
        self.model_control = settings.model_control
        self.auth_health = settings.auth_health

    def load(self) -> None:
        """Read the token files; ``ConfigError`` if one is missing, unreadable or empty."""
        settings = self._settings
        if settings.auth_token_file:
            self.tokens = TokenFile(settings.auth_token_file, "--auth-token-file")
        if settings.admin_token_file:
            self.admin = TokenFile(settings.admin_token_file, "--admin-token-file")
        if self.model_control == "token" and self.admin is None:
            raise ConfigError("--model-control token needs --admin-token-file")

    def check_call(self, authorization: str | None, api: str) -> None:
        """Any call over ``api``: a valid token when tokens are required (admin tokens are valid
        too). Raises ``UnauthenticatedError``, counted."""
        if self.tokens is None:
            return
        try:
            self._check_token(authorization)
        except UnauthenticatedError as exc:
            self._on_denied(api, exc.code.lower())
            raise

    def _check_token(self, authorization: str | None) -> None:
        assert self.tokens is not None
        token = bearer(authorization)
        if token is None:
            raise UnauthenticatedError(
                "this server requires a token: send 'authorization: Bearer <token>' "
                "(gRPC metadata or HTTP header)"
            )
        if not (self.tokens.accepts(token) or (self.admin and self.admin.accepts(token))):
            raise UnauthenticatedError("the bearer token is not valid here")

    def check_control(self, authorization: str | None, api: str) -> None:
        """Loading or unloading a model over ``api``. Raises ``PermissionDeniedError`` or
        ``UnauthenticatedError``, counted."""
        try:
            self._check_control(authorization)
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            self._on_denied(api, exc.code.lower())
            raise

    def _check_control(self, authorization: str | None) -> None:
        if self.model_control == "off":
            raise PermissionDeniedError(
                "loading and unloading models over the API is off (--model-control off); start "
                "the server with --model-control open, or token with --admin-token-file"
            )
        if self.model_control == "token":
            assert self.admin is not None
            token = bearer(authorization)
            if token is None:
                raise UnauthenticatedError(
                    "loading and unloading models needs an admin token: send "
                    "'authorization: Bearer <token>' (--model-control token)"
                )
            if not self.admin.accepts(token):
                raise PermissionDeniedError(
                    "this token may not load or unload models (--model-control token accepts "
                    "the tokens of --admin-token-file)"
                )

    def guards(self, method: str) -> bool:
        """Whether gRPC ``method`` needs a token."""
        return self.tokens is not None and (
            self.auth_health or not method.startswith(OPEN_SERVICES)
        )


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses, before any handler runs, a gRPC call without a valid token."""

    def __init__(self, access: Access) -> None:
        self._access = access

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self._access.guards(details.method):
            return handler
        metadata: Mapping[str, Any] = dict(details.invocation_metadata or ())
        try:
            self._access.check_call(metadata.get("authorization"), "grpc")
        except UnauthenticatedError as exc:
            return _refusing(handler, exc)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, exc: UnauthenticatedError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with ``exc``'s status."""
    code, message = status_code(exc), str(exc)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler(unary),
        "unary_stream": grpc.unary_stream_rpc_method_handler(streaming),
        "stream_unary": grpc.stream_unary_rpc_method_handler(unary),
        "stream_stream": grpc.stream_stream_rpc_method_handler(streaming),
    }
    # The same kind as the real handler, but no deserializer: the request is never parsed.
    return next(refusing for kind, refusing in kinds.items() if getattr(handler, kind))
