"""What differs between a lone server and one worker of several sharing a port (``--workers``):
the ``Server`` is given its role and asks it, rather than asking whether it is a worker."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

from torchwire.repository import ModelRepository
from torchwire.repository.repository import Offload
from torchwire.server.common.shm import Regions
from torchwire.server.plane.control import Control, LocalRegions, ModelControl, RegionControl

log = logging.getLogger("torchwire.server")


class Role(Protocol):
    @property
    def shares_port(self) -> bool:
        """Bind the ports with SO_REUSEPORT (the other workers listen on them too)."""
        ...

    @property
    def serves_while_loading(self) -> bool:
        """Take connections before the models are loaded (health answers NOT_SERVING
        meanwhile); a worker takes them only once it can answer, the others serving meanwhile."""
        ...

    @property
    def process_metrics(self) -> bool:
        """The process's own metrics on /metrics (a worker's page is the supervisor's)."""
        ...

    @property
    def unloaded(self) -> frozenset[str]:
        """Models not to load: unloaded through the API before this process started."""
        ...

    @property
    def cores(self) -> int:
        """The cores this process's models share (0: all)."""
        ...

    @property
    def offload(self) -> Offload | None:
        """Where the models an engine takes are loaded instead of here (None: nowhere)."""
        ...

    def control(self, repository: ModelRepository) -> ModelControl:
        """Who applies the loads and unloads that clients ask for."""
        ...

    def region_control(self, regions: Regions) -> RegionControl:
        """Who applies the shared memory registrations that clients ask for."""
        ...

    def banner(self, where: str) -> list[str] | None:
        """The first line of the start-up banner, or None: say nothing of the models."""
        ...


@dataclass(frozen=True)
class LoneServer:
    """A server on its own: its repository is the one clients change."""

    shares_port: bool = False
    serves_while_loading: bool = True
    process_metrics: bool = True
    unloaded: frozenset[str] = frozenset()
    cores: int = 0
    offload: Offload | None = None

    def control(self, repository: ModelRepository) -> ModelControl:
        return repository

    def region_control(self, regions: Regions) -> RegionControl:
        return LocalRegions(regions)

    def banner(self, where: str) -> list[str] | None:
        return [f"torchwire serving on {where}"]


@dataclass(frozen=True)
class WorkerRole:
    """One worker of several on a port: loads and unloads, and shared memory registrations, go
    through the supervisor to every worker (``fleet``), and the supervisor says "serving" once
    all are ready.

    Attributes:
        index: the worker's number, 0 to N-1 (a restarted worker keeps its number).
        fleet: applies load/unload and region requests on every worker.
        unloaded: models unloaded through the API before this worker started.
        cores: this worker's share of the machine; what ``--torch-threads`` does not set is
            chosen within it.
        offload: the engines, which hold the models they take for every worker.
    """

    index: int
    fleet: Control
    unloaded: frozenset[str] = frozenset()
    cores: int = 0
    offload: Offload | None = None
    shares_port: bool = True
    serves_while_loading: bool = False
    process_metrics: bool = False

    def control(self, repository: ModelRepository) -> ModelControl:
        return self.fleet

    def region_control(self, regions: Regions) -> RegionControl:
        return self.fleet

    def banner(self, where: str) -> list[str] | None:
        log.info("worker %d (pid %d) ready on %s", self.index, os.getpid(), where)
        return [f"worker {self.index} models:"] if self.index == 0 else None
