"""torchwire: serve PyTorch models over gRPC from asyncio Python."""

__version__ = "0.1.0"

__all__ = ["__version__"]
