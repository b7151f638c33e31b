"""Who applies a change that a client asks for: a model load or unload (V2 RepositoryModelLoad/
Unload), a shared memory region registered or unregistered (SystemSharedMemoryRegister/
Unregister).

A lone server applies it to its own repository or regions. A worker of ``torchwire serve
--workers N`` hands it to its supervisor, which applies it on every worker before the caller
gets an answer, so that a client sees the same models and regions on every connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torchwire.server.common.shm import Regions


class ModelControl(Protocol):
    """Loads and unloads models by name (``ModelRepository`` is one)."""

    async def load_model(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...


class RegionControl(Protocol):
    """Registers and unregisters shared memory regions by name."""

    async def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None: ...

    async def unregister_region(self, name: str) -> None:
        """Forget ``name``, or every region when it is empty."""
        ...


class Control(ModelControl, RegionControl, Protocol):
    """Both: what a worker's supervisor applies on every worker."""


@dataclass(frozen=True)
class LocalRegions:
    """A lone server's regions: a change applies here alone."""

    regions: Regions

    async def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.regions.register(name, key, offset, byte_size)

    async def unregister_region(self, name: str) -> None:
        self.regions.unregister(name)
