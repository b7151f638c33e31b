"""One loaded model version: the model on its device, its batcher and inference threads."""

from torchwire.runtime.batcher import Batcher
from torchwire.runtime.model import LoadedModel

__all__ = ["Batcher", "LoadedModel"]
