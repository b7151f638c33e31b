"""One loaded model version: the model on its device, its batcher and inference threads."""

from torchwire.runtime.batcher import LOOP_BUSY, Batcher, Done, ThreadLoad, Ticket
from torchwire.runtime.model import LoadedModel

__all__ = ["LOOP_BUSY", "Batcher", "Done", "LoadedModel", "ThreadLoad", "Ticket"]
