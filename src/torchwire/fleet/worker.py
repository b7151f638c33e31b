"""One worker of ``torchwire serve --workers N``: a whole server on the shared port.

The supervisor runs ``python -m torchwire.fleet.worker`` with its orders in the environment
(``fleet.contract.WorkerSpec``) and one end of a socket pair, the link. Over the link the
worker says when it serves, hands over the model loads and unloads that clients ask of it (the
supervisor applies them on every worker), and applies those the supervisor sends (the messages:
``fleet.contract``). When the link closes (the supervisor is gone, even by SIGKILL) the worker
shuts down as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from torchwire.errors import TorchwireError, UnavailableError
from torchwire.fleet.contract import (
    Apply,
    Change,
    Ready,
    Region,
    RegionApply,
    RegionChange,
    WorkerSpec,
    from_message,
    to_message,
)
from torchwire.fleet.engine_client import Engines
from torchwire.fleet.link import Link, Message
from torchwire.logs import configure_logging
from torchwire.native import tune_malloc
from torchwire.server import Server
from torchwire.server.process.lifecycle import run_in_loop, serve_until_stopped
from torchwire.server.process.role import WorkerRole

log = logging.getLogger("torchwire.fleet")


class FleetControl:
    """Model loads and unloads, and shared memory registrations, asked of this worker: the
    supervisor applies them on all."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def load_model(self, name: str) -> None:
        await self._link.request(to_message(Change("load", name)))

    async def unload(self, name: str) -> None:
        await self._link.request(to_message(Change("unload", name)))

    async def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None:
        region = Region(name, key, offset, byte_size)
        await self._link.request(to_message(RegionChange("register", region)))

    async def unregister_region(self, name: str) -> None:
        await self._link.request(to_message(RegionChange("unregister", Region(name))))


async def apply_change(server: Server, change: Apply | RegionApply, index: int) -> None:
    """A change the supervisor applies on every worker, here."""
    if isinstance(change, RegionApply):
        apply_region(server, change)
    elif server.repository is None:
        raise UnavailableError(f"worker {index} is still starting")
    elif change.action == "load":
        await server.repository.load_model(change.model)
    else:
        await server.repository.unload(change.model)


def apply_region(server: Server, change: RegionApply) -> None:
    region = change.region
    if change.action == "register":
        server.regions.ensure(region.name, region.key, region.offset, region.byte_size)
    else:
        server.regions.unregister(region.name)


def register_before_serving(server: Server, regions: tuple[Region, ...]) -> None:
    """The regions clients registered before this worker started."""
    for region in regions:
        try:
            apply_region(server, RegionApply("register", region))
        except TorchwireError as exc:  # its file is gone: calls naming it fail here
            log.warning("shared memory region %r: %s", region.name, exc)


async def serve_as_worker(spec: WorkerSpec) -> int:
    """Serve until SIGTERM, SIGINT or the supervisor's going away; return the exit code."""
    server: Server | None = None

    async def on_message(message: Message) -> Message | None:
        said = from_message(message)
        if not isinstance(said, Apply | RegionApply):
            raise TorchwireError(f"the supervisor does not send {message!r}", "INVALID_ARGUMENT")
        if server is None:
            raise UnavailableError(f"worker {spec.index} is still starting")
        await apply_change(server, said, spec.index)
        return {}

    link = await Link.open(socket.socket(fileno=spec.link_fd), on_message)
    engines = Engines(spec.settings, spec.engines, spec.index) if spec.engines else None
    role = WorkerRole(spec.index, FleetControl(link), spec.unloaded, spec.cores, offload=engines)
    server = Server(spec.settings, role)
    register_before_serving(server, spec.regions)
    if engines is not None:
        tasks: set[asyncio.Task[None]] = set()

        def engines_changed(ok: bool) -> None:
            task = asyncio.create_task(server.health.engines(ok))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        engines.on_change = engines_changed
    stop = asyncio.Event()

    async def supervisor_gone() -> None:
        await link.closed.wait()
        if not stop.is_set():
            log.warning("the supervisor is gone: shutting down")
            stop.set()

    watch = asyncio.create_task(supervisor_gone())

    async def ready() -> None:
        try:
            await link.notify(to_message(Ready()))
        except UnavailableError:  # the supervisor went away while this worker started
            stop.set()

    try:
        return await serve_until_stopped(server, stop, ready)
    finally:
        watch.cancel()
        if engines is not None:
            await engines.close()
        await link.close()


def main() -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serving: the supervisor's rescan
    spec = WorkerSpec.from_env()
    settings = spec.settings
    configure_logging(settings.log_level, settings.log_format, worker=spec.index)
    tune_malloc(settings.malloc_arenas, settings.malloc_keep_mb)
    return run_in_loop(settings, lambda: serve_as_worker(spec))


if __name__ == "__main__":
    raise SystemExit(main())
