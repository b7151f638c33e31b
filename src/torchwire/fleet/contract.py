"""The contract between the supervisor of ``torchwire serve --workers N`` and its workers and
engines, in one place: the orders a worker or engine starts with (``WorkerSpec``,
``EngineSpec``, carried in the environment) and the messages on the link between them
(``Ready``; ``Change``/``Apply`` for models, ``RegionChange``/``RegionApply`` for shared memory
regions). Both sides build and read them here; neither spells a key of the other's."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Literal

from torchwire.config import ServerSettings
from torchwire.errors import TorchwireError
from torchwire.fleet.link import Message

WORKER_SPEC_ENV = "TORCHWIRE_WORKER_SPEC"
"""The environment variable that carries a worker's ``WorkerSpec`` (JSON)."""
ENGINE_SPEC_ENV = "TORCHWIRE_ENGINE_SPEC"
"""The environment variable that carries an engine's ``EngineSpec`` (JSON)."""

Action = Literal["load", "unload"]
RegionAction = Literal["register", "unregister"]


@dataclass(frozen=True)
class Region:
    """A system shared memory region as a client registers it (Triton's four fields)."""

    name: str
    key: str = ""
    offset: int = 0
    byte_size: int = 0


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells a worker it starts.

    Attributes:
        index: the worker's number, 0 to N-1 (a restarted worker keeps its number).
        link_fd: the worker's end of the socket pair to the supervisor.
        unloaded: models unloaded through the API before this worker started: not loaded.
        cores: the cores this worker's models share (its share of the machine).
        settings: the server's settings, with the shared ports filled in.
        engines: the engines' sockets by device (``cpu``, ``cuda:0``): the models an engine
            takes are held there, not in the worker.
        regions: the shared memory regions clients registered before this worker started: it
            registers them before it serves.
    """

    index: int
    link_fd: int
    unloaded: frozenset[str]
    cores: int
    settings: ServerSettings
    engines: dict[str, str] = field(default_factory=dict)
    regions: tuple[Region, ...] = ()

    def to_env(self) -> dict[str, str]:
        spec = {
            "index": self.index,
            "link_fd": self.link_fd,
            "unloaded": sorted(self.unloaded),
            "cores": self.cores,
            "settings": self.settings.model_dump(mode="json"),
            "engines": self.engines,
            "regions": [asdict(region) for region in self.regions],
        }
        return {WORKER_SPEC_ENV: json.dumps(spec)}

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> WorkerSpec:
        """Read (and take out of the environment) the spec the supervisor gave."""
        environ = os.environ if environ is None else environ
        spec = json.loads(environ.pop(WORKER_SPEC_ENV))
        return cls(
            index=int(spec["index"]),
            link_fd=int(spec["link_fd"]),
            unloaded=frozenset(spec["unloaded"]),
            cores=int(spec["cores"]),
            settings=ServerSettings.model_validate(spec["settings"]),
            engines=dict(spec["engines"]),
            regions=tuple(Region(**region) for region in spec["regions"]),
        )


@dataclass(frozen=True)
class EngineSpec:
    """What the supervisor tells an engine it starts.

    Attributes:
        device: the device whose models it holds (``cpu``, ``cuda:0``).
        socket: the Unix socket it listens on for workers.
        link_fd: its end of the socket pair to the supervisor (it says ``Ready`` there).
        settings: the server's settings.
    """

    device: str
    socket: str
    link_fd: int
    settings: ServerSettings

    def to_env(self) -> dict[str, str]:
        spec = {
            "device": self.device,
            "socket": self.socket,
            "link_fd": self.link_fd,
            "settings": self.settings.model_dump(mode="json"),
        }
        return {ENGINE_SPEC_ENV: json.dumps(spec)}

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> EngineSpec:
        environ = os.environ if environ is None else environ
        spec = json.loads(environ.pop(ENGINE_SPEC_ENV))
        return cls(
            device=str(spec["device"]),
            socket=str(spec["socket"]),
            link_fd=int(spec["link_fd"]),
            settings=ServerSettings.model_validate(spec["settings"]),
        )


@dataclass(frozen=True)
class Ready:
    """Worker to supervisor: it serves (it gets the changes it missed, then traffic counts)."""


@dataclass(frozen=True)
class Change:
    """Worker to supervisor: a client asked this worker to load or unload a model; the
    supervisor applies it on every worker before the client gets its answer."""

    action: Action
    model: str


@dataclass(frozen=True)
class Apply:
    """Supervisor to worker: load or unload a model in this worker's repository."""

    action: Action
    model: str


@dataclass(frozen=True)
class RegionChange:
    """Worker to supervisor: a client registered or unregistered a shared memory region with
    this worker; the supervisor applies it on every worker before the client gets its answer,
    so that any connection can name it. Unregister reads only the name ('': every region)."""

    action: RegionAction
    region: Region


@dataclass(frozen=True)
class RegionApply:
    """Supervisor to worker: register or unregister a shared memory region here."""

    action: RegionAction
    region: Region


LinkMessage = Ready | Change | Apply | RegionChange | RegionApply


def to_message(message: LinkMessage) -> Message:
    """``message`` as it travels on the link."""
    if isinstance(message, Ready):
        return {"op": "ready"}
    if isinstance(message, Change):
        return {"op": message.action, "model": message.model}
    if isinstance(message, Apply):
        return {"op": "apply", "action": message.action, "model": message.model}
    op = "region" if isinstance(message, RegionChange) else "apply_region"
    return {"op": op, "action": message.action, **asdict(message.region)}


def from_message(message: Mapping[str, object]) -> LinkMessage:
    """A message read from the link; ``INVALID_ARGUMENT`` for one this contract does not hold."""
    op = message.get("op")
    model = message.get("model")
    if op == "ready":
        return Ready()
    if op in ("load", "unload") and isinstance(model, str):
        return Change("load" if op == "load" else "unload", model)
    action = message.get("action")
    if op == "apply" and action in ("load", "unload") and isinstance(model, str):
        return Apply("load" if action == "load" else "unload", model)
    if op in ("region", "apply_region") and action in ("register", "unregister"):
        region = _region(message)
        if region is not None:
            kind = RegionChange if op == "region" else RegionApply
            return kind("register" if action == "register" else "unregister", region)
    raise TorchwireError(f"unknown link message {dict(message)!r}", "INVALID_ARGUMENT")


def _region(message: Mapping[str, object]) -> Region | None:
    name, key, offset, size = (message.get(k) for k in ("name", "key", "offset", "byte_size"))
    if not (isinstance(name, str) and isinstance(key, str)):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)):
        return None
    assert isinstance(offset, int) and isinstance(size, int)
    return Region(name, key, offset, size)
