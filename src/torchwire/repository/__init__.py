"""Which model versions are served: scanning, loading, selecting; the built-in demo models."""

from torchwire.repository.demo import ensure_demo_repository
from torchwire.repository.repository import (
    ModelRepository,
    ModelSource,
    ServedModel,
    model_file_source,
    scan_repository,
)

__all__ = [
    "ModelRepository",
    "ModelSource",
    "ServedModel",
    "ensure_demo_repository",
    "model_file_source",
    "scan_repository",
]
