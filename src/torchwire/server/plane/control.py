"""Who applies a repository change that a client asks for (V2 RepositoryModelLoad/Unload).

A lone server applies it to its own repository. A worker of ``torchwire serve --workers N`` hands
it to its supervisor, which applies it on every worker before the caller gets an answer, so that
a client sees the same models on every connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ModelControl(Protocol):
    """Loads and unloads models by name (``ModelRepository`` is one)."""

    async def load_model(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...


@dataclass(frozen=True)
class WorkerRole:
    """What makes a ``Server`` one worker of several sharing a port.

    Attributes:
        index: the worker's number, 0 to N-1 (a restarted worker keeps its number).
        control: applies load/unload requests on every worker.
        unloaded: models unloaded through the API before this worker started: not loaded.
        cores: the cores this worker's models share, its share of the machine (0: all); what
            ``--torch-threads`` does not set is chosen within it.
    """

    index: int
    control: ModelControl
    unloaded: frozenset[str] = frozenset()
    cores: int = 0
