"""Protocol adapters (gRPC servicers, codecs, health) and the server process that hosts them."""

from torchwire.server.app import Server

__all__ = ["Server"]
