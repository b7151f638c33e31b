"""The KServe V2 REST API on aiohttp, on the server's own event loop.

Protocol adapter only, like the gRPC servicers: the same repository, batchers, model control,
health, metrics (``api="v2_http"``) and error table (``errors.HTTP_STATUS``). Every error is a
JSON body ``{"error": "..."}`` with the status its cause maps to; an unexpected one is logged and
answered 500 without details.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from torchwire.compat.aiohttp_runner import set_shutdown_timeout
from torchwire.errors import (
    HTTP_STATUS,
    RETRY_AFTER_METADATA,
    ConfigError,
    InvalidInputError,
    TorchwireError,
    VersionClosedError,
    report_bug,
)
from torchwire.runtime import Batcher
from torchwire.runtime.arrays import Arrays
from torchwire.server.common.observe import Call
from torchwire.server.http.codec import HEADER_LENGTH, HttpInfer, decode, encode, parse_body
from torchwire.server.plane import kserve

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(value, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def error_response(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """torchwire errors and aiohttp's own (no route, body too large) as JSON; bugs as 500."""
    try:
        return await handler(request)
    except TorchwireError as exc:
        response = error_response(HTTP_STATUS.get(exc.code, 500), str(exc))
        if exc.code == "UNAUTHENTICATED":
            response.headers["WWW-Authenticate"] = "Bearer"
        if RETRY_AFTER_METADATA in exc.metadata:  # seconds, at least 1 (RFC 9110)
            wait_ms = int(exc.metadata[RETRY_AFTER_METADATA])
            response.headers["Retry-After"] = str(max(1, -(-wait_ms // 1000)))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text or exc.reason
        if isinstance(exc, web.HTTPNotFound):
            message = f"no such endpoint: {request.method} {request.path} (see /v2)"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            message = (
                f"{request.method} is not allowed on {request.path}; use {exc.allowed_methods}"
            )
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            message = f"the request body is too large: {exc.text} (--max-message-bytes)"
        return error_response(exc.status, message)
    except Exception as exc:
        bug = report_bug(log, f"unexpected error serving {request.method} {request.path}", exc)
        return error_response(500, str(bug))


class HttpApi:
    """The routes, bound to the served models."""

    def __init__(self, backend: kserve.Backend) -> None:
        self._backend = backend
        self._plane = backend.plane

    @property
    def needs_tokens(self) -> bool:
        return self._backend.access.tokens is not None

    @web.middleware
    async def tokens(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request but health checks (unless --auth-health) needs a valid token."""
        if self._backend.access.auth_health or not request.path.startswith("/v2/health/"):
            self._backend.access.check_call(request.headers.get("Authorization"), "v2_http")
        return await handler(request)

    def _check_control(self, request: web.Request) -> None:
        self._backend.access.check_control(request.headers.get("Authorization"), "v2_http")

    def routes(self) -> list[web.RouteDef]:
        model = "/v2/models/{model}"
        version = model + "/versions/{version}"
        return [
            web.get("/v2", self.server_metadata),
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2/models/stats", self.statistics),
            *[
                route
                for base in (model, version)
                for route in (
                    web.get(base, self.model_metadata),
                    web.get(base + "/ready", self.model_ready),
                    web.get(base + "/config", self.model_config),
                    web.get(base + "/stats", self.statistics),
                    web.post(base + "/infer", self.infer),
                )
            ],
            web.post("/v2/repository/index", self.repository_index),
            web.post("/v2/repository/models/{model}/load", self.load),
            web.post("/v2/repository/models/{model}/unload", self.unload),
            web.get("/v2/systemsharedmemory/status", self.shm_status),
            web.get("/v2/systemsharedmemory/region/{region}/status", self.shm_status),
            web.post("/v2/systemsharedmemory/region/{region}/register", self.shm_register),
            web.post("/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister),
            web.post("/v2/systemsharedmemory/unregister", self.shm_unregister),
        ]

    # -- system shared memory ------------------------------------------------------------------

    async def shm_status(self, request: web.Request) -> web.Response:
        self._check_control(request)  # a region is the server user's memory: control's rights
        return _json(self._backend.regions.status(request.match_info.get("region", "")))

    async def shm_register(self, request: web.Request) -> web.Response:
        self._check_control(request)
        body = await self._body(request)
        key, offset, size = body.get("key"), body.get("offset", 0), body.get("byte_size")
        if not isinstance(key, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)
        ):
            raise InvalidInputError(
                'register takes {"key": string, "offset": integer, "byte_size": integer}'
            )
        assert isinstance(offset, int) and isinstance(size, int)
        await self._backend.region_control.register_region(
            request.match_info["region"], key, offset, size
        )
        return _json({})

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self._check_control(request)
        await self._body(request)
        await self._backend.region_control.unregister_region(request.match_info.get("region", ""))
        return _json({})

    # -- server and model state ------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(kserve.server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self._backend.health.ready_to_serve:
            return web.Response(status=200)
        return error_response(503, "not ready: models loading, shutting down or memory short")

    def _batcher(self, request: web.Request) -> Any:
        info = request.match_info
        return kserve.find(self._backend.repository, info["model"], info.get("version", ""))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(kserve.model_metadata(self._backend.repository, self._batcher(request)))

    async def model_ready(self, request: web.Request) -> web.Response:
        if not self._batcher(request).available:  # 404 unless loaded
            return error_response(503, "the model is loaded but cannot answer now; retry")
        return web.Response(status=200)

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(kserve.model_config(self._batcher(request)))

    async def statistics(self, request: web.Request) -> web.Response:
        info = request.match_info
        view = kserve.model_statistics(
            self._backend.repository, info.get("model", ""), info.get("version", "")
        )
        return _json(view)

    # -- repository ------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        return parse_body(raw, None)[0]

    async def repository_index(self, request: web.Request) -> web.Response:
        ready = (await self._body(request)).get("ready") is True
        return _json(await kserve.repository_index(self._backend.repository, ready))

    async def load(self, request: web.Request) -> web.Response:
        self._check_control(request)
        body = await self._body(request)
        parameters = body.get("parameters", {})
        kserve.check_load_parameters(parameters if isinstance(parameters, dict) else ["?"])
        await self._backend.control.load_model(kserve.check_model_name(request.match_info["model"]))
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        self._check_control(request)
        await self._body(request)
        await self._backend.control.unload(kserve.check_model_name(request.match_info["model"]))
        return _json({})

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version", "")
        with self._backend.observer.http_call("v2_http", request.remote, request.headers) as call:
            batcher = self._plane.target(name, version, call, None)
            body = await request.read()
            header, binary = parse_body(body, request.headers.get(HEADER_LENGTH))
            try:
                decoded, answered = self._submit(batcher, header, binary, call)
            except VersionClosedError:  # a reload retired the version while the body was read
                batcher = self._plane.target(name, version, call, None)
                decoded, answered = self._submit(batcher, header, binary, call)
            outputs = await answered
            answer, header_length = encode(
                decoded, batcher.model, batcher.name, batcher.version, outputs,
                self._backend.regions,
            )  # fmt: skip
        if header_length is None:
            return web.Response(body=answer, content_type="application/json")
        return web.Response(
            body=answer,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    def _submit(
        self, batcher: Batcher, header: dict[str, Any], binary: memoryview, call: Call
    ) -> tuple[HttpInfer, asyncio.Future[Arrays]]:
        """Decode the request for ``batcher``'s model and queue it there."""
        decoded = decode(header, binary, batcher.model, self._backend.regions)
        call.items = decoded.items
        deadline = None
        if decoded.timeout_us is not None:
            deadline = time.monotonic() + decoded.timeout_us / 1e6
        return decoded, batcher.submit(decoded.arrays, decoded.items, deadline)


class HttpFrontend:
    """The REST API served on a port until ``stop``."""

    def __init__(self, api: HttpApi, max_body_bytes: int) -> None:
        middlewares = [_errors, api.tokens] if api.needs_tokens else [_errors]
        app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
        app.add_routes(api.routes())
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self.port: int | None = None

    async def start(
        self, host: str, port: int, reuse_port: bool, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Listen on ``host:port`` (shared with other workers when ``reuse_port``), over TLS
        with ``ssl_context``."""
        await self._runner.setup()
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            sock.close()
            await self._runner.cleanup()
            raise ConfigError(f"cannot listen on {host}:{port} (HTTP): {exc}") from None
        site = web.SockSite(self._runner, sock, backlog=1024, ssl_context=ssl_context)
        await site.start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop listening; requests in flight get ``grace_s`` to finish."""
        set_shutdown_timeout(self._runner, grace_s)
        await asyncio.wait_for(self._runner.cleanup(), grace_s + 5)
