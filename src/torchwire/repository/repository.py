"""Which model versions are served, which one answers a request, and how that changes.

``load`` reads the disk at start-up and fails on anything wrong. ``reconcile`` (run by the
watcher, or on SIGHUP) brings the served versions in line with the disk while serving: a new or
changed version file is loaded and validated off the event loop, then swapped in with one dict
assignment (the next request goes to it; requests queued on the old version finish there, and
the old version is released once drained); a file that fails leaves the serving version untouched
and is not retried until it changes again; a removed version or model is unloaded after draining,
but never the last version standing of a model whose replacement failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from torchwire.config import ModelConfig
from torchwire.errors import ConfigError, DeviceFailedError, ModelNotFoundError, UnavailableError
from torchwire.metrics import Metrics
from torchwire.repository.sources import ModelSource, Scanner, Stamp
from torchwire.runtime import Batcher, LoadedModel
from torchwire.runtime.cost import measure

log = logging.getLogger(__name__)

LoadKey = tuple[Stamp | None, Stamp | None]
ModelListener = Callable[[str, bool], Awaitable[None]]


class Offload(Protocol):
    """Where model versions load instead of in this process (an engine, ``--engine``)."""

    def takes(self, config: ModelConfig) -> bool:
        """Whether a model of this config loads there."""
        ...

    async def load(self, source: ModelSource, version: int, metrics: Metrics) -> Batcher:
        """Load the version there; the batcher returned queues its requests there."""
        ...


def load_batcher(
    source: ModelSource,
    version: int,
    torch_threads: int,
    cores: int,
    metrics: Metrics,
    on_device_failure: Callable[[DeviceFailedError], None] | None = None,
) -> Batcher:
    """Load, warm up, time and wrap one version (blocking: call it from a thread)."""
    started = time.monotonic()
    model = LoadedModel.load(source.files[version], source.config)
    try:
        model.warm_up()
        cost = measure(model, torch_threads, cores)
    except BaseException:  # what it holds (memory, a Python model's modules) goes now
        model.release()
        raise
    batcher = Batcher(
        model, source.name, version, cost, metrics.for_model(source.name),
        on_device_failure=on_device_failure,
    )  # fmt: skip
    log.info(
        "loaded %s version %d from %s in %.2f s: %d intra-op thread(s) (%s), %s",
        source.name,
        version,
        source.files[version],
        time.monotonic() - started,
        cost.threads,
        cost.why,
        f"batches of <= {batcher.inline_items} items inline"
        if batcher.inline_items
        else "no batch inline",
    )
    return batcher


@dataclass
class ServedModel:
    """A model and its loaded versions; the highest version is the default."""

    name: str
    versions: dict[int, Batcher] = field(default_factory=dict)
    keys: dict[int, LoadKey] = field(default_factory=dict)

    @property
    def default_version(self) -> int:
        return max(self.versions)

    def default(self) -> Batcher:
        """The default version's batcher, found in one step (a single C call, which no other
        thread interleaves): the event loop adds and pops versions while the native front end's
        thread finds them, and between two lookups the version found first may be gone."""
        return max(self.versions.items())[1]


def _signature(batcher: Batcher) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(o.name, o.dtype, o.shape) for o in batcher.model.outputs]


def _shown(text: str) -> str:
    """A client's name for an error message: quoted, and cut at 80 characters (a 100 kB name
    must not become a 100 kB status that gRPC refuses to send)."""
    return repr(text) if len(text) <= 80 else repr(text[:80]) + f"... ({len(text)} characters)"


class ModelRepository:
    """The served models; owns their batchers from load to close.

    Args:
        scanner: reads the repository directory or model file.
        default_model: the model answering requests that name none (default: first by name).
        torch_threads: intra-op threads per model (``--torch-threads``; 0: chosen at load).
        cores: the cores this process's models share (a worker's share; 0: all).
        on_device_failure: called (on the event loop) when a model's device fails for good.
        metrics: where loads, versions and batches are counted.
        on_model_change: awaited with (name, True) when a model becomes served and
            (name, False) when it stops being served.
        unloaded: models to leave unloaded, as if ``unload`` had been called (a worker that
            starts after a client unloaded them on the others).
        offload: loads the models it takes elsewhere (an engine process) instead of here.
    """

    def __init__(
        self,
        scanner: Scanner,
        default_model: str | None = None,
        torch_threads: int = 0,
        metrics: Metrics | None = None,
        on_model_change: ModelListener | None = None,
        unloaded: Iterable[str] = (),
        cores: int = 0,
        on_device_failure: Callable[[DeviceFailedError], None] | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.scanner = scanner
        self.offload = offload
        self.default_model = default_model or ""
        self._torch_threads, self._cores = torch_threads, cores
        self.metrics = metrics or Metrics(process_metrics=False)
        self.on_model_change = on_model_change
        self.on_device_failure = on_device_failure
        self.models: dict[str, ServedModel] = {}
        self._loaded = False
        self._lock = asyncio.Lock()  # one reconcile at a time: never two loads of one model
        self._failed: dict[tuple[str, int], tuple[LoadKey, str]] = {}
        self._scan_errors: dict[str, str] = {}
        self._unloaded: set[str] = set(unloaded)
        self._retiring: set[asyncio.Task[bool]] = set()

    async def load(self) -> None:
        """Load every model at start-up; raise ``ConfigError`` on anything wrong."""
        async with self._lock:
            scan = await asyncio.to_thread(self.scanner.scan)
            scan.raise_errors()
            names = sorted(scan.sources)
            if self.default_model and self.default_model not in names:
                raise ConfigError(
                    f"default model {self.default_model!r} is not served; models: {names}"
                )
            self.default_model = self.default_model or names[0]
            for name in (name for name in names if name not in self._unloaded):
                source = scan.sources[name]
                served = ServedModel(name)
                for version in sorted(source.files):
                    served.versions[version] = await self._load(source, version)
                    served.keys[version] = source.key(version)
                self.models[name] = served  # served only once every version is ready
                self.metrics.model_version.labels(name).set(served.default_version)
            self._loaded = True

    async def reconcile(self) -> None:
        """Bring the served versions in line with the disk; never raises for a bad file."""
        async with self._lock:
            scan = await asyncio.to_thread(self.scanner.scan)
            for name, error in scan.errors.items():
                if self._scan_errors.get(name) != str(error):  # say it once per distinct error
                    log.error(
                        "cannot read model %r, still serving what was loaded: %s", name, error
                    )
                    self.metrics.model_loads.labels(name or "(repository)", "failed").inc()
            self._scan_errors = {name: str(error) for name, error in scan.errors.items()}
            for name, source in sorted(scan.sources.items()):
                if name not in self._unloaded:
                    await self._sync(source)
            for name in list(self.models):
                if name not in scan.sources and name not in scan.errors:
                    log.info(
                        "model %s is gone from disk: unloading it after its queue drains", name
                    )
                    await self._remove(name)

    async def _load(
        self, source: ModelSource, version: int, served: ServedModel | None = None
    ) -> Batcher:
        """Load and validate one version off the loop, counting the outcome; start it."""
        outcomes = self.metrics.model_loads
        try:
            if self.offload is not None and self.offload.takes(source.config):
                batcher = await self.offload.load(source, version, self.metrics)
            else:
                batcher = await asyncio.to_thread(
                    load_batcher, source, version, self._torch_threads, self._cores,
                    self.metrics, self.on_device_failure,
                )  # fmt: skip
            batcher.start(asyncio.get_running_loop())
            if served is not None:
                self._check_signature(served, batcher, source)
        except DeviceFailedError as exc:  # in its warm-up or timing: the process must restart
            outcomes.labels(source.name, "failed").inc()
            if self.on_device_failure is not None:
                self.on_device_failure(exc)
            raise ConfigError(f"{source.files[version]}: {exc}") from exc
        except Exception:
            outcomes.labels(source.name, "failed").inc()
            raise
        outcomes.labels(source.name, "ok").inc()
        return batcher

    async def _sync(self, source: ModelSource) -> None:
        """Load what is new or changed of one model, swap it in, retire what is not wanted."""
        name = source.name
        served = self.models.get(name) or ServedModel(name)
        fresh: dict[int, Batcher] = {}
        for version in sorted(source.files):
            key = source.key(version)
            failed = self._failed.get((name, version))
            if served.keys.get(version) == key or (failed is not None and failed[0] == key):
                continue  # current, or already failed with these very files
            try:
                batcher = await self._load(source, version, served)
            except Exception as exc:
                self._failed[(name, version)] = (key, str(exc))
                serving = sorted(served.versions) or "nothing"
                log.error("%s: not loaded, still serving %s versions %s: %s",
                          source.files[version], name, serving, exc)  # fmt: skip
                continue
            self._failed.pop((name, version), None)
            fresh[version] = batcher
            served.keys[version] = key
        for version, batcher in fresh.items():
            old = served.versions.get(version)
            served.versions[version] = batcher  # the swap: the next request goes here
            if old is not None:
                log.info(
                    "%s version %d: swapped in the new file; the old one drains", name, version
                )
                self._retire(old)
        stale = [v for v in served.versions if v not in source.files]
        if len(stale) < len(served.versions):  # keep the last version standing, whatever happens
            for version in stale:
                log.info("%s version %d: no longer wanted; unloading after drain", name, version)
                served.keys.pop(version, None)
                self._retire(served.versions.pop(version))
        if served.versions and name not in self.models:
            self.models[name] = served
            if self.on_model_change is not None:
                await self.on_model_change(name, True)
        if served.versions:
            self.metrics.model_version.labels(name).set(served.default_version)

    def _check_signature(self, served: ServedModel, batcher: Batcher, source: ModelSource) -> None:
        """A new file of a model whose config is unchanged must answer with the same outputs."""
        if not served.versions or source.config.outputs:
            return  # declared outputs were checked by the warm-up already
        current = served.default()
        if served.keys.get(served.default_version, (None, None))[1] != source.config_stamp:
            return  # the config changed: a new signature is legitimate
        if _signature(batcher) != _signature(current):
            self._retire(batcher)
            raise ConfigError(
                f"outputs changed from {_signature(current)} to {_signature(batcher)}; declare "
                "the outputs in config.toml to change them"
            )

    def _retire(self, batcher: Batcher, timeout_s: float = 30.0) -> None:
        """Close a version in the background: it finishes what is queued, then is released."""
        task = asyncio.get_running_loop().create_task(batcher.close(timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _remove(self, name: str) -> None:
        served = self.models.pop(name)
        # Under --workers, a removed gauge child stays in the shared file: 0 says "not served".
        self.metrics.model_version.labels(name).set(0)
        self.metrics.model_version.remove(name)
        if self.on_model_change is not None:
            await self.on_model_change(name, False)
        for batcher in served.versions.values():
            self._retire(batcher)

    def get(self, model: str | None = None, version: str | None = None) -> Batcher:
        """The batcher answering for ``model`` (default model if empty) at ``version``.

        Raises:
            ModelNotFoundError: naming what is served.
            UnavailableError: models are still loading.
        """
        name = model or self.default_model
        served = self.models.get(name)
        if served is None:
            if not self._loaded:
                raise UnavailableError(f"models are still loading; {name!r} is not ready yet")
            raise ModelNotFoundError(
                f"model {_shown(name)} not found; served: {sorted(self.models)}"
            )
        if not version:
            return served.default()
        is_number = version.isascii() and version.isdigit()  # isdigit alone takes superscripts
        batcher = served.versions.get(int(version)) if is_number else None
        if batcher is None:
            raise ModelNotFoundError(
                f"version {_shown(version)} of model {_shown(name)} not found; versions: "
                f"{sorted(served.versions)}"
            )
        return batcher

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` until asked again (the watcher leaves it alone meanwhile)."""
        async with self._lock:
            if name not in self.models:
                raise ModelNotFoundError(
                    f"model {_shown(name)} not found; served: {sorted(self.models)}"
                )
            self._unloaded.add(name)
            await self._remove(name)
        log.info("unloaded %s", name)

    async def load_model(self, name: str) -> None:
        """Load (or reload) ``name`` from disk now, even if it was unloaded.

        Raises:
            ModelNotFoundError: no such model on disk.
            ConfigError: it cannot be read or no version of it loads (with the reasons).
        """
        async with self._lock:
            scan = await asyncio.to_thread(self.scanner.scan)
            for broken in (name, ""):  # the model's directory, or the whole repository
                if broken in scan.errors:
                    raise ConfigError(self.for_clients(str(scan.errors[broken])))
            source = scan.sources.get(name)
            if source is None:
                raise ModelNotFoundError(
                    f"model {name!r} is not in the repository; it has {sorted(scan.sources)}"
                )
            self._unloaded.discard(name)
            for version in source.files:  # an explicit load tries failed files again
                self._failed.pop((name, version), None)
            await self._sync(source)
            if name not in self.models:
                reasons = [
                    f"version {v}: {reason}"
                    for (model, v), (_, reason) in sorted(self._failed.items())
                    if model == name
                ]
                raise ConfigError(
                    self.for_clients(f"model {name!r} failed to load: {'; '.join(reasons)}")
                )

    def for_clients(self, message: str) -> str:
        """``message`` with the repository's absolute path taken out: clients see paths
        relative to the repository, not where the server keeps it."""
        root = self.scanner.root
        return message.replace(f"{root}{os.sep}", "").replace(str(root), ".") if root else message

    async def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every model on disk or served."""
        scan = await asyncio.to_thread(self.scanner.scan)
        rows: list[tuple[str, str, str, str]] = []
        for name in sorted(set(scan.sources) | set(scan.errors) | set(self.models)):
            served = self.models.get(name)
            if served is not None:
                rows += [(name, str(v), "READY", "") for v in sorted(served.versions)]
            elif name in self._unloaded:
                rows.append((name, "", "UNAVAILABLE", "unloaded"))
            elif name in scan.errors:
                rows.append((name, "", "UNAVAILABLE", self.for_clients(str(scan.errors[name]))))
            elif name:
                rows.append((name, "", "UNAVAILABLE", "not loaded"))
        return rows

    async def drained(self) -> None:
        """Wait until every retired version has finished its queue and stopped."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def close(self, timeout_s: float = 30.0) -> bool:
        """Finish queued requests and stop every inference thread within ``timeout_s``; return
        False if one was still computing then (it is abandoned)."""
        async with self._lock:
            for served in self.models.values():
                for batcher in served.versions.values():
                    self._retire(batcher, timeout_s)
            if not self._retiring:
                return True
            done, late = await asyncio.wait(self._retiring, timeout=timeout_s + 1.0)
            return not late and all(task.result() for task in done)
