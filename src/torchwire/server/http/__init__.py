"""The KServe V2 REST API (``--http-port``), beside gRPC on the same event loop."""

from torchwire.server.http.app import HttpApi, HttpFrontend

__all__ = ["HttpApi", "HttpFrontend"]
