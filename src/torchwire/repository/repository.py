"""Which model versions are served, and which one answers a request.

A repository directory holds ``<model>/config.toml`` and ``<model>/<version>/model.pt``
(``model.pt2`` for ``format = "exported"``); the version policy picks the versions loaded. A single
file (``--model FILE``) is served as version 1 of a model named after the file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from torchwire.config import ModelConfig, TensorSpec, load_model_config
from torchwire.errors import ConfigError, ModelNotFoundError, UnavailableError
from torchwire.metrics import Metrics
from torchwire.runtime import Batcher, LoadedModel

log = logging.getLogger(__name__)

MODEL_FILES = {"torchscript": "model.pt", "exported": "model.pt2"}


@dataclass(frozen=True)
class ModelSource:
    """A model found on disk: its config and the files of the versions to load."""

    name: str
    config: ModelConfig
    files: dict[int, Path]


@dataclass
class ServedModel:
    """A model and its loaded versions; the highest version is the default."""

    name: str
    versions: dict[int, Batcher] = field(default_factory=dict)

    @property
    def default_version(self) -> int:
        return max(self.versions)


def _select_versions(config: ModelConfig, found: dict[int, Path], where: Path) -> dict[int, Path]:
    policy = config.versions
    if policy.policy == "latest":
        return {max(found): found[max(found)]} if found else {}
    if policy.policy == "all":
        return found
    missing = [v for v in policy.specific if v not in found]
    if missing:
        raise ConfigError(f"{where}: versions {missing} are listed in [versions] but have no file")
    return {v: found[v] for v in policy.specific}


def scan_model_dir(directory: Path) -> ModelSource:
    """Read one model directory of a repository."""
    config = load_model_config(directory / "config.toml")
    filename = MODEL_FILES[config.format]
    found = {
        int(child.name): child / filename
        for child in directory.iterdir()
        if child.is_dir() and child.name.isdigit() and (child / filename).is_file()
    }
    selected = _select_versions(config, found, directory)
    if not selected:
        raise ConfigError(f"{directory}: no version directory holds a {filename}")
    return ModelSource(directory.name, config, selected)


def scan_repository(root: Path) -> list[ModelSource]:
    """Read every model directory under ``root`` (hidden entries are skipped)."""
    if not root.is_dir():
        raise ConfigError(f"{root}: model repository is not a directory")
    sources = [
        scan_model_dir(child)
        for child in sorted(root.iterdir())
        if child.is_dir() and not child.name.startswith(".")
    ]
    if not sources:
        raise ConfigError(f"{root}: no model directories (expected <model>/config.toml)")
    return sources


def model_file_source(path: Path, input_shape: tuple[int, ...] | None) -> ModelSource:
    """A single TorchScript file; its shape from a ``config.toml`` beside it or ``input_shape``."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    beside = path.parent / "config.toml"
    if input_shape is not None:
        config = ModelConfig(inputs=[TensorSpec(name="input", shape=input_shape)])
    elif beside.is_file():
        config = load_model_config(beside)
    else:
        raise ConfigError(
            f"{path}: the input shape is unknown; put a config.toml beside it or pass "
            "--input-shape (per item, e.g. 3,224,224)"
        )
    return ModelSource(path.stem, config, {1: path})


def load_version(
    source: ModelSource, version: int, torch_threads: int, metrics: Metrics
) -> Batcher:
    """Load, warm up and wrap one version (blocking: call it from a thread)."""
    started = time.monotonic()
    try:
        model = LoadedModel.load(source.files[version], source.config)
        model.warm_up()
    except Exception:
        metrics.model_loads.labels(source.name, "failed").inc()
        raise
    metrics.model_loads.labels(source.name, "ok").inc()
    log.info(
        "loaded %s version %d from %s in %.2f s",
        source.name,
        version,
        source.files[version],
        time.monotonic() - started,
    )
    return Batcher(model, source.name, version, torch_threads, metrics.for_model(source.name))


class ModelRepository:
    """The served models; owns their batchers from start to close.

    Args:
        sources: what to load.
        default_model: the model answering requests that name none (default: first by name).
        torch_threads: intra-op threads per model (0: all cores).
        metrics: where loads, versions and batches are counted.
    """

    def __init__(
        self,
        sources: list[ModelSource],
        default_model: str | None = None,
        torch_threads: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        names = sorted(source.name for source in sources)
        if default_model is not None and default_model not in names:
            raise ConfigError(f"default model {default_model!r} is not served; models: {names}")
        self.default_model = default_model or names[0]
        self._sources = sources
        self._torch_threads = torch_threads
        self.metrics = metrics or Metrics(process_metrics=False)
        self.models: dict[str, ServedModel] = {}
        self._loaded = False

    async def load(self) -> None:
        """Load every version, one after the other, off the event loop."""
        loop = asyncio.get_running_loop()
        for source in self._sources:
            served = ServedModel(source.name)
            for version in sorted(source.files):
                batcher = await asyncio.to_thread(
                    load_version, source, version, self._torch_threads, self.metrics
                )
                batcher.start(loop)
                served.versions[version] = batcher
            self.models[source.name] = served  # served only once every version is ready
            self.metrics.model_version.labels(source.name).set(served.default_version)
        self._loaded = True

    async def unload(self, name: str, timeout_s: float = 30.0) -> None:
        """Stop serving ``name``: new requests get NOT_FOUND, queued ones finish first."""
        served = self.models.pop(name, None)
        if served is None:
            raise ModelNotFoundError(f"model {name!r} not found; served: {sorted(self.models)}")
        self.metrics.model_version.remove(name)
        await asyncio.gather(*(b.close(timeout_s) for b in served.versions.values()))
        log.info("unloaded %s", name)

    def get(self, model: str | None = None, version: str | None = None) -> Batcher:
        """The batcher answering for ``model`` (default model if empty) at ``version``.

        Raises:
            ModelNotFoundError: naming what is served.
        """
        name = model or self.default_model
        served = self.models.get(name)
        if served is None:
            if not self._loaded:
                raise UnavailableError(f"models are still loading; {name!r} is not ready yet")
            raise ModelNotFoundError(f"model {name!r} not found; served: {sorted(self.models)}")
        if not version:
            return served.versions[served.default_version]
        batcher = served.versions.get(int(version)) if version.isdigit() else None
        if batcher is None:
            raise ModelNotFoundError(
                f"version {version!r} of model {name!r} not found; versions: "
                f"{sorted(served.versions)}"
            )
        return batcher

    async def close(self, timeout_s: float = 30.0) -> None:
        """Finish queued requests and stop every inference thread."""
        batchers = [b for served in self.models.values() for b in served.versions.values()]
        await asyncio.gather(*(b.close(timeout_s) for b in batchers))
