"""Who applies a repository change that a client asks for (V2 RepositoryModelLoad/Unload).

A lone server applies it to its own repository. A worker of ``torchwire serve --workers N`` hands
it to its supervisor, which applies it on every worker before the caller gets an answer, so that
a client sees the same models on every connection.
"""

from __future__ import annotations

from typing import Protocol


class ModelControl(Protocol):
    """Loads and unloads models by name (``ModelRepository`` is one)."""

    async def load_model(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...
