"""The server: its process (``process``) hosts the transports (``rpc``, ``http``), which hand every
request to the data plane (``plane``), which decodes it (``codecs``) and queues it on the
repository's batchers; ``common`` holds what they all use. Read top-down from ``process.app``."""

from torchwire.server.process.app import Server

__all__ = ["Server"]
