"""Which model versions are served: reading the disk, loading, swapping, watching; the demo."""

from torchwire.repository.demo import ensure_demo_repository
from torchwire.repository.repository import ModelRepository, ServedModel
from torchwire.repository.sources import ModelSource, Scanner, model_file_source
from torchwire.repository.watcher import RepositoryWatcher, snapshot

__all__ = [
    "ModelRepository",
    "ModelSource",
    "RepositoryWatcher",
    "Scanner",
    "ServedModel",
    "ensure_demo_repository",
    "model_file_source",
    "snapshot",
]
