"""One loaded model version: the model on its device, its batcher and inference threads."""

from torchwire.runtime.batcher import Batcher, Done, ThreadLoad, Ticket
from torchwire.runtime.model import LoadedModel

__all__ = ["Batcher", "Done", "LoadedModel", "ThreadLoad", "Ticket"]
