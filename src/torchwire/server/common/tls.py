"""TLS for gRPC and HTTP from the settings' PEM files, reloaded when the files change: renewed
certificates (cert-manager, Let's Encrypt) take effect on the next connection, no restart.

The files are checked (a few ``stat`` calls) on each new TLS handshake: gRPC asks through its
certificate fetcher, HTTP through the SSL context's SNI callback. New files that do not form a
valid pair are logged and the current certificate is kept.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path
from typing import Any

import grpc

from torchwire.config import ServerSettings
from torchwire.errors import ConfigError

log = logging.getLogger(__name__)

_Pem = tuple[bytes, bytes, bytes | None]  # key, certificate chain, client CA


class TlsFiles:
    """The key, certificate and optional client CA of ``--tls-*``; None of them: plaintext."""

    def __init__(self, settings: ServerSettings) -> None:
        self.key, self.cert, self.client_ca = (
            settings.tls_key,
            settings.tls_cert,
            settings.tls_client_ca,
        )
        self.enabled = bool(self.key or self.cert)
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int], ...] = ()
        self._http: ssl.SSLContext | None = None
        if not self.enabled:
            if self.client_ca:
                raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
            return
        if not (self.key and self.cert):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        self._stamp = self._stat()
        self._pem = self._read()

    def _paths(self) -> list[Path]:
        return [p for p in (self.key, self.cert, self.client_ca) if p is not None]

    def _stat(self) -> tuple[tuple[int, int], ...]:
        try:
            return tuple((s.st_mtime_ns, s.st_size) for s in map(os.stat, self._paths()))
        except OSError as exc:
            raise ConfigError(f"cannot read TLS files: {exc}") from None

    def _read(self) -> _Pem:
        """The files' contents, checked to form a pair (``ConfigError`` saying why not)."""
        assert self.key is not None and self.cert is not None
        try:
            pem = (
                self.key.read_bytes(),
                self.cert.read_bytes(),
                self.client_ca.read_bytes() if self.client_ca else None,
            )
        except OSError as exc:
            raise ConfigError(f"cannot read TLS files: {exc}") from None
        try:  # gRPC would only say "Failed to bind to address"
            self._context()
        except ssl.SSLError as exc:
            raise ConfigError(
                f"--tls-key {self.key} does not go with --tls-cert {self.cert} (both PEM, the "
                f"key the certificate's): {exc.reason or exc}"
            ) from None
        return pem

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert self.key is not None and self.cert is not None
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _changed(self) -> bool:
        """Re-read the files if they changed since the last look; True if new ones took."""
        with self._lock:
            try:
                stamp = self._stat()
            except ConfigError:
                return False  # half-replaced (renamed away): look again on the next handshake
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                self._pem = self._read()
                self._http = self._context() if self._http is not None else None
            except (ConfigError, ssl.SSLError) as exc:
                log.warning("TLS files changed but cannot be used, keeping the current: %s", exc)
                return False
            log.info("TLS certificate reloaded from %s", self.cert)
            return True

    # -- gRPC ----------------------------------------------------------------------------------

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        if not self.enabled:
            return None
        credentials: grpc.ServerCredentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            self._fetch,
            require_client_authentication=self.client_ca is not None,
        )
        return credentials

    def _configuration(self) -> Any:
        key, cert, client_ca = self._pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def _fetch(self) -> Any:
        """gRPC's question at each handshake: a new configuration, or None to keep the last."""
        return self._configuration() if self._changed() else None

    # -- HTTP ----------------------------------------------------------------------------------

    def http_context(self) -> ssl.SSLContext | None:
        """An SSL context that swaps in the new certificate on the first handshake after the
        files change."""
        if not self.enabled:
            return None
        self._http = self._context()
        front = self._context()

        def on_hello(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            self._changed()
            if self._http is not None:
                connection.context = self._http

        front.sni_callback = on_hello
        return front
