"""``torchwire serve --workers N``: a supervisor process and N worker processes on one port.

Each worker is a whole server (``torchwire.fleet.worker``): its own event loop, batchers and copy
of every model, bound to the shared gRPC port with SO_REUSEPORT, so the kernel spreads new
connections over the workers. The supervisor loads no model. It holds the port (bound, never
listening: it picks the port for ``--port 0`` and keeps anyone else off it), serves the one
/metrics page, and keeps each worker slot filled:

- a worker that exits is started again, at once after a long run, with a growing pause when it
  keeps dying, and counted in ``torchwire_worker_restarts_total``; one that fails to start
  ``MAX_START_FAILURES`` times in a row (or with a bad configuration, exit code 2) stops the
  whole server with a non-zero exit code instead of looping forever;
- SIGTERM/SIGINT: every worker drains as a lone server does, then the supervisor exits 0;
  SIGHUP: every worker rescans its models;
- a model load or unload a client asks of one worker comes here over that worker's link and is
  applied on every worker before the client gets its answer; a worker started later starts with
  the same models unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from torchwire.config import ServerSettings, available_cores
from torchwire.errors import (
    ABANDONED_CALLS,
    DEVICE_FAILED,
    START_FAILED,
    ConfigError,
    InvalidInputError,
    TorchwireError,
)
from torchwire.fleet.contract import (
    Action,
    Apply,
    Change,
    EngineSpec,
    Ready,
    Region,
    RegionApply,
    RegionChange,
    WorkerSpec,
    from_message,
    to_message,
)
from torchwire.fleet.link import Link, Message
from torchwire.fleet.metrics import FleetMetrics
from torchwire.fleet.plan import engine_devices

log = logging.getLogger("torchwire.fleet")

MAX_START_FAILURES = 5
"""A slot whose worker fails to start this many times in a row stops the server."""
STABLE_RUN_S = 30.0
"""A worker that served this long before exiting is restarted at once (no pause)."""
MAX_PAUSE_S = 10.0
"""Longest pause before starting a worker that keeps dying."""
STOP_MARGIN_S = 15.0
"""Beyond the shutdown delay and grace period, how long workers get to exit before SIGKILL."""


@dataclass(eq=False)
class Worker:
    """One worker process and the supervisor's view of it."""

    index: int
    process: asyncio.subprocess.Process
    unloaded_at_start: frozenset[str]
    regions_at_start: tuple[Region, ...] = ()
    link: Link | None = None
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> str:
        return f"worker {self.index} (pid {self.pid})"

    def served_s(self) -> float | None:
        """How long it has served; None if it never became ready."""
        return None if self.ready_at is None else time.monotonic() - self.ready_at


@dataclass(eq=False)
class Engine:
    """One engine process (``torchwire.fleet.engine``) and the supervisor's view of it."""

    device: str
    process: asyncio.subprocess.Process
    link: Link | None = None
    ready_at: float | None = None

    @property
    def label(self) -> str:
        """Its name in the metrics' ``worker`` label."""
        return f"engine-{self.device}"

    def describe(self) -> str:
        return f"engine of {self.device} (pid {self.process.pid})"


def _failures(
    targets: list[Worker], results: list[TorchwireError | None]
) -> list[tuple[Worker, TorchwireError]]:
    """The workers a change failed on. One that died meanwhile is no failure: its successor
    catches up when ready."""
    return [
        (w, e)
        for w, e in zip(targets, results, strict=True)
        if e is not None and not (w.link is not None and w.link.closed.is_set())
    ]


def _raise_failures(what: str, failed: list[tuple[Worker, TorchwireError]], targets: int) -> None:
    if not failed:
        return
    errors = {(e.code, str(e)) for _, e in failed}
    if len(failed) == targets and len(errors) == 1:
        raise failed[0][1]  # the same answer everywhere: say it as one server would
    where = "; ".join(f"{w.describe()}: {e.code}: {e}" for w, e in failed)
    raise TorchwireError(
        f"{what} failed on {len(failed)} of {targets} workers: {where}", failed[0][1].code
    )


def exit_cause(code: int) -> str:
    """``exited with code 3 (a model call hung)`` or ``killed by SIGKILL``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    why = {ABANDONED_CALLS: " (a model call hung)", DEVICE_FAILED: " (a model's device failed)"}
    return f"exited with code {code}{why.get(code, '')}"


class Supervisor:
    """Runs ``settings.worker_count()`` workers on one port until SIGTERM or SIGINT."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.count = settings.worker_count()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._workers: dict[int, Worker] = {}
        self._unloaded: set[str] = set()
        self._regions: dict[str, Region] = {}
        """The shared memory regions clients registered: on every worker."""
        self._control = asyncio.Lock()  # one load/unload at a time, in the same order everywhere
        self._stopping = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._exit_code = 0
        self._clean = True
        self._metrics_dir = tempfile.mkdtemp(prefix="torchwire-metrics-")
        self.metrics = FleetMetrics(self._metrics_dir, self._processes)
        self._port_holders: list[socket.socket] = []
        self.http_port: int | None = None
        self.engine_devices = engine_devices(settings)
        """The devices whose models an engine holds for all workers (``--engine``)."""
        self._engines: dict[str, Engine] = {}
        self._engines_ready = asyncio.Event()
        self._engine_stop = asyncio.Event()  # set once the workers have stopped
        self._engine_dir = ""
        self._engine_sockets: dict[str, str] = {}

    def pids(self) -> dict[int, int]:
        """The live workers: number to PID."""
        return {i: w.pid for i, w in self._workers.items() if w.process.returncode is None}

    def _processes(self) -> dict[str, int]:
        """The live workers and engines, by their ``worker`` label, for the metrics."""
        engines = {
            e.label: e.process.pid for e in self._engines.values() if e.process.returncode is None
        }
        return {str(i): pid for i, pid in self.pids().items()} | engines

    async def run(self) -> int:
        """Start the workers, serve until told to stop, stop them; return the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signum)
        # Workers still starting read the disk anyway, and have no SIGHUP handler yet.
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP, True)
        try:
            self.port = self._hold_port(self.settings.port, "gRPC")
            if self.settings.http_port:
                self.http_port = self._hold_port(self.settings.http_bind_port(), "HTTP")
            if self.settings.metrics_enabled:
                self.metrics_port = self.metrics.serve(
                    self.settings.metrics_host, self.settings.metrics_port
                )
        except ConfigError as exc:
            log.error("%s", exc)
            self._cleanup()
            return START_FAILED
        engines = await self._start_engines()
        slots = [asyncio.create_task(self._keep(index)) for index in range(self.count)]
        ready = asyncio.create_task(self._all_ready.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and not self._stopping.is_set():
            self._log_banner()
        await stopping
        ready.cancel()
        await self._stop_workers(slots)
        await self._stop_engines(engines)  # after the workers: their last calls need them
        self._cleanup()
        log.info("stopped")
        return self._exit_code or (0 if self._clean else 1)

    # -- the port ----------------------------------------------------------------------------

    def _hold_port(self, port: int, api: str) -> int:
        """Bind ``port`` with SO_REUSEPORT (never listening) so the workers can share it and
        nobody else can take it; a port already in use is an error, not a silent share. Return
        the port (the one picked for 0)."""
        host = self.settings.host
        try:
            family, kind, _, _, address = socket.getaddrinfo(
                host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            if port:
                with socket.socket(family, kind) as probe:  # fails if anything listens there
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(address)
            holder = socket.socket(family, kind)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({api}): {exc}") from None
        self._port_holders.append(holder)
        bound: int = holder.getsockname()[1]
        return bound

    # -- worker slots ------------------------------------------------------------------------

    async def _keep(self, index: int) -> None:
        """Keep slot ``index`` filled until the server stops or gives up on it."""
        start_failures = 0
        streak = 0  # exits in a row after short lives
        ever_ready = False
        while not self._stopping.is_set():
            try:
                worker = await self._spawn(index)
            except OSError as exc:  # no process at all: fork or exec failed
                log.error("cannot start worker %d: %s: stopping the server", index, exc)
                self._exit_code = 1
                self._stopping.set()
                return
            code = await worker.process.wait()
            served_s = worker.served_s()
            await self._exited(worker, code)
            if self._stopping.is_set():
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    self._clean = False
                return
            if served_s is None:
                start_failures += 1
                log.warning("worker %d failed to start (%d in a row)", index, start_failures)
                # A bad configuration will not fix itself, unless the slot has served before
                # (then the disk changed under a running server, which keeps serving).
                bad_config = code == START_FAILED and not ever_ready
                if bad_config or start_failures >= MAX_START_FAILURES:
                    why = "its configuration" if bad_config else "repeated failures"
                    log.error(
                        "%s failed to start %d time(s) in a row (%s, last %s): stopping the server",
                        f"worker {index}", start_failures, why, exit_cause(code),
                    )  # fmt: skip
                    self._exit_code = START_FAILED if bad_config else 1
                    self._stopping.set()
                    return
            else:
                ever_ready, start_failures = True, 0
            stable = served_s is not None and served_s >= STABLE_RUN_S
            streak = 0 if stable else streak + 1
            pause = 0.0 if streak == 0 else min(MAX_PAUSE_S, 0.5 * 2 ** (streak - 1))
            log.warning(
                "%s %s; starting it again in %.1f s", worker.describe(), exit_cause(code), pause
            )
            self.metrics.restarts.labels(str(index)).inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)

    async def _spawn(self, index: int) -> Worker:
        parent_end, child_end = socket.socketpair()
        settings = self.settings.model_copy(
            update={"port": self.port, "http_port": self.http_port or 0, "metrics_enabled": False}
        )
        unloaded = frozenset(self._unloaded)
        regions = tuple(self._regions.values())
        spec = WorkerSpec(
            index=index,
            link_fd=child_end.fileno(),
            unloaded=unloaded,
            cores=max(1, available_cores() // self.count),
            settings=settings,
            engines=self._engine_sockets,
            regions=regions,
        )
        env = {**os.environ, **spec.to_env(), "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "torchwire.fleet.worker",
                env=env,
                pass_fds=[child_end.fileno()],
                # Its own session: a terminal's Ctrl-C reaches the supervisor only, which stops
                # the workers in order (a worker also stops when the supervisor is gone).
                start_new_session=True,
            )
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        worker = Worker(index, process, unloaded, regions)
        self._workers[index] = worker
        if self._stopping.is_set():  # stopped while it was being started: stop it too
            process.send_signal(signal.SIGTERM)
        worker.link = await Link.open(parent_end, lambda message: self._on_message(worker, message))
        self.metrics.worker_started(index, process.pid)
        log.info("%s started", worker.describe())
        return worker

    async def _exited(self, worker: Worker, code: int) -> None:
        if worker.ready_at is not None:
            self.metrics.ready.dec()
        worker.ready_at = None
        self.metrics.worker_exited(worker.index, worker.pid)
        if worker.link is not None:
            await worker.link.close()
        if self._stopping.is_set():
            log.info("%s %s", worker.describe(), exit_cause(code))

    # -- engines -----------------------------------------------------------------------------

    async def _start_engines(self) -> list[asyncio.Task[None]]:
        """Start an engine per device that needs one and wait until each serves (workers load
        their models from them)."""
        if not self.engine_devices:
            return []
        self._engine_dir = tempfile.mkdtemp(prefix="torchwire-engine-")  # this user's alone
        self._engine_sockets = {
            device: os.path.join(self._engine_dir, f"{device.replace(':', '-')}.sock")
            for device in self.engine_devices
        }
        slots = [asyncio.create_task(self._keep_engine(d)) for d in self.engine_devices]
        ready = asyncio.create_task(self._engines_ready.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        return slots

    async def _keep_engine(self, device: str) -> None:
        """Keep the engine of ``device`` running until the workers have stopped."""
        start_failures = streak = 0
        while not self._engine_stop.is_set():
            try:
                engine = await self._spawn_engine(device)
            except OSError as exc:
                log.error("cannot start the engine of %s: %s: stopping the server", device, exc)
                self._exit_code = 1
                self._stopping.set()
                return
            code = await engine.process.wait()
            served_s = None if engine.ready_at is None else time.monotonic() - engine.ready_at
            self.metrics.worker_exited(engine.label, engine.process.pid)
            if engine.link is not None:
                await engine.link.close()
            if self._engine_stop.is_set():
                log.info("%s %s", engine.describe(), exit_cause(code))
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    self._clean = False
                return
            if served_s is None:
                start_failures += 1
                if start_failures >= MAX_START_FAILURES or code == START_FAILED:
                    log.error(
                        "%s failed to start %d time(s) in a row (last %s): stopping the server",
                        engine.describe(), start_failures, exit_cause(code),
                    )  # fmt: skip
                    self._exit_code = START_FAILED if code == START_FAILED else 1
                    self._stopping.set()
                    return
            else:
                start_failures = 0
            streak = 0 if served_s is not None and served_s >= STABLE_RUN_S else streak + 1
            pause = 0.0 if streak <= 1 else min(MAX_PAUSE_S, 0.5 * 2 ** (streak - 2))
            log.warning(
                "%s %s; its workers answer UNAVAILABLE for its models until it is back; "
                "starting it again in %.1f s", engine.describe(), exit_cause(code), pause,
            )  # fmt: skip
            self.metrics.restarts.labels(engine.label).inc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._engine_stop.wait(), pause)

    async def _spawn_engine(self, device: str) -> Engine:
        parent_end, child_end = socket.socketpair()
        settings = self.settings.model_copy(update={"metrics_enabled": False})
        spec = EngineSpec(device, self._engine_sockets[device], child_end.fileno(), settings)
        env = {**os.environ, **spec.to_env(), "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "torchwire.fleet.engine", env=env,
                pass_fds=[child_end.fileno()], start_new_session=True,
            )  # fmt: skip
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        engine = Engine(device, process)
        self._engines[device] = engine
        if self._engine_stop.is_set():  # started again while the engines stop: stop it too
            process.send_signal(signal.SIGTERM)

        async def on_message(message: Message) -> Message | None:
            if not isinstance(from_message(message), Ready):
                raise TorchwireError(f"an engine does not send {message!r}", "INVALID_ARGUMENT")
            engine.ready_at = time.monotonic()
            log.info("%s serving", engine.describe())
            engines = [self._engines.get(device) for device in self.engine_devices]
            if all(e is not None and e.ready_at is not None for e in engines):
                self._engines_ready.set()
            return None

        engine.link = await Link.open(parent_end, on_message)
        self.metrics.worker_started(engine.label, process.pid)
        log.info("%s started", engine.describe())
        return engine

    async def _stop_engines(self, slots: list[asyncio.Task[None]]) -> None:
        if not slots:
            return
        self._engine_stop.set()
        for engine in self._engines.values():
            if engine.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    engine.process.send_signal(signal.SIGTERM)
        budget = self.settings.grace_period_s + STOP_MARGIN_S
        _, late = await asyncio.wait(slots, timeout=budget)
        if late:
            log.error("engines still running %.0f s after SIGTERM: killing them", budget)
            self._clean = False
            for engine in self._engines.values():
                with contextlib.suppress(ProcessLookupError):
                    engine.process.kill()
            await asyncio.gather(*late, return_exceptions=True)

    # -- what workers say --------------------------------------------------------------------

    async def _on_message(self, worker: Worker, message: Message) -> Message | None:
        said = from_message(message)
        if isinstance(said, Ready):
            await self._ready(worker)
            return None
        if isinstance(said, Change):
            await self._apply_everywhere(worker, said.action, said.model)
            return {}
        if isinstance(said, RegionChange):
            await self._share_everywhere(worker, said)
            return {}
        raise TorchwireError(f"a worker does not send {message!r}", "INVALID_ARGUMENT")

    async def _ready(self, worker: Worker) -> None:
        """A worker serves: first give it the loads and unloads, and the region registrations,
        it missed while it started."""
        async with self._control:
            assert worker.link is not None
            if worker.link.closed.is_set() or worker.process.returncode is not None:
                return  # it died meanwhile
            missed: list[Apply | RegionApply] = [
                *(Apply("unload", n) for n in self._unloaded - worker.unloaded_at_start),
                *(Apply("load", n) for n in worker.unloaded_at_start - self._unloaded),
                *(
                    RegionApply("unregister", Region(r.name))
                    for r in worker.regions_at_start
                    if r.name not in self._regions
                ),
                *(
                    RegionApply("register", r)
                    for r in self._regions.values()
                    if r not in worker.regions_at_start
                ),
            ]
            for change in missed:
                # A region whose file is gone: calls naming it fail on this worker.
                if (exc := await self._send(worker, change)) is not None:
                    what = (
                        f"{change.action} {change.model}"
                        if isinstance(change, Apply)
                        else f"{change.action} of shared memory region {change.region.name!r}"
                    )
                    log.warning("%s: catching up on %s: %s", worker.describe(), what, exc)
            worker.ready_at = time.monotonic()
            self.metrics.ready.inc()
        log.info("%s serving", worker.describe())
        if len([w for w in self._workers.values() if w.ready_at is not None]) == self.count:
            self._all_ready.set()

    async def _apply_everywhere(self, origin: Worker, op: Action, name: str) -> None:
        """Load or unload ``name`` on every serving worker; raise what failed, naming where."""
        async with self._control:
            targets = self._targets(origin)
            results = await asyncio.gather(*(self._send(w, Apply(op, name)) for w in targets))
            failed = _failures(targets, results)
            if op == "load":
                self._unloaded.discard(name)  # as each worker's repository does, even on failure
            elif len(failed) < len(targets):
                self._unloaded.add(name)
        _raise_failures(f"{op} {name!r}", failed, len(targets))

    async def _share_everywhere(self, origin: Worker, change: RegionChange) -> None:
        """Register or unregister a shared memory region on every serving worker; a
        registration that fails anywhere is undone everywhere, then raised naming where."""
        region = change.region
        async with self._control:
            if change.action == "register" and region.name in self._regions:
                raise InvalidInputError(
                    f"shared memory region {region.name!r} is registered already"
                )
            targets = self._targets(origin)
            apply = RegionApply(change.action, region)
            results = await asyncio.gather(*(self._send(w, apply) for w in targets))
            failed = _failures(targets, results)
            if change.action == "unregister":
                names = [region.name] if region.name else list(self._regions)
                for name in names:
                    self._regions.pop(name, None)
            elif failed:
                undo = RegionApply("unregister", Region(region.name))
                done = [w for w, e in zip(targets, results, strict=True) if e is None]
                await asyncio.gather(*(self._send(w, undo) for w in done))
            else:
                self._regions[region.name] = region
        _raise_failures(f"{change.action} region {region.name!r}", failed, len(targets))

    def _targets(self, origin: Worker) -> list[Worker]:
        """Who a change applies to: the serving workers, and the one that asked (a worker
        starting meanwhile catches up when ready)."""
        return [w for w in self._workers.values() if w.ready_at is not None or w is origin]

    async def _send(self, worker: Worker, message: Apply | RegionApply) -> TorchwireError | None:
        """``message`` to ``worker``; what it raised, if anything."""
        assert worker.link is not None
        try:
            await worker.link.request(to_message(message))
        except TorchwireError as exc:
            return exc
        return None

    # -- signals and shutdown ----------------------------------------------------------------

    def _request_stop(self, signum: int) -> None:
        if self._stopping.is_set():
            if signum == signal.SIGINT:
                log.warning("second SIGINT: killing the workers and exiting now")
                self._forward(signal.SIGKILL)
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
                os._exit(1)
            return
        log.info("%s received: stopping %d workers", signal.Signals(signum).name, self.count)
        self._stopping.set()

    def _forward(self, signum: int, ready_only: bool = False) -> None:
        for worker in self._workers.values():
            if ready_only and worker.ready_at is None:
                continue
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def _stop_workers(self, slots: list[asyncio.Task[None]]) -> None:
        self._forward(signal.SIGTERM)
        budget = self.settings.shutdown_delay_s + self.settings.grace_period_s + STOP_MARGIN_S
        _, late = await asyncio.wait(slots, timeout=budget)
        if late:
            log.error("workers still running %.0f s after SIGTERM: killing them", budget)
            self._clean = False
            self._forward(signal.SIGKILL)
            await asyncio.gather(*late, return_exceptions=True)

    def _cleanup(self) -> None:
        self.metrics.close()
        for holder in self._port_holders:
            holder.close()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._engine_dir:
            shutil.rmtree(self._engine_dir, ignore_errors=True)

    def _log_banner(self) -> None:
        tls = " over TLS" if self.settings.tls_cert else ""
        workers = ", ".join(f"{i}: pid {pid}" for i, pid in sorted(self.pids().items()))
        engines = "".join(
            f"; engine of {e.device}: pid {e.process.pid}" for e in self._engines.values()
        )
        http = f", {self.settings.host}:{self.http_port} (HTTP{tls})" if self.http_port else ""
        lines = [
            f"torchwire serving on {self.settings.host}:{self.port} (gRPC{tls}){http} with "
            f"{self.count} workers (supervisor pid {os.getpid()}; workers {workers}{engines})"
        ]
        if self.metrics_port is not None:
            lines.append(
                f"  metrics: http://{self.settings.metrics_host}:{self.metrics_port}/metrics"
            )
        log.info("\n".join(lines))
