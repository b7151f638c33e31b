"""What is on disk: model directories, their configs and version files, each with a stamp.

A repository directory holds ``<model>/config.toml`` and ``<model>/<version>/model.pt``
(``model.pt2`` for ``format = "exported"``); the version policy picks the versions to serve. A
single file (``--model FILE``) is version 1 of a model named after the file. A stamp (inode, size,
mtime) tells whether a file changed since it was loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torchwire.config import ModelConfig, TensorSpec, load_model_config
from torchwire.errors import ConfigError

MODEL_FILES = {
    "torchscript": "model.pt",
    "exported": "model.pt2",
    "aoti": "model.pt2",
    "python": "model.py",
}

Stamp = tuple[int, int, int]  # inode, size, mtime in ns


def stamp(path: Path) -> Stamp | None:
    """The file's stamp, or None when it does not exist (now)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class ModelSource:
    """A model found on disk: its config and the files of the versions to serve."""

    name: str
    config: ModelConfig
    files: dict[int, Path]
    stamps: dict[int, Stamp | None] = field(default_factory=dict)
    config_stamp: Stamp | None = None

    def key(self, version: int) -> tuple[Stamp | None, Stamp | None]:
        """What must stay the same for a loaded version to stay current."""
        return (self.stamps.get(version), self.config_stamp)


@dataclass
class Scan:
    """One reading of the disk: the models found, and the models that could not be read."""

    sources: dict[str, ModelSource] = field(default_factory=dict)
    errors: dict[str, ConfigError] = field(default_factory=dict)

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigError("\n".join(str(e) for e in self.errors.values()))


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
    config_path = directory / "config.toml"
    config_stamp = stamp(config_path)
    config = load_model_config(config_path)
    filename = MODEL_FILES[config.format]
    found = {
        int(child.name): child / filename
        for child in directory.iterdir()
        if child.is_dir()
        and child.name.isascii()
        and child.name.isdigit()
        and (child / filename).is_file()
    }
    selected = _select_versions(config, found, directory)
    if not selected:
        raise ConfigError(f"{directory}: no version directory holds a {filename}")
    stamps = {version: stamp(path) for version, path in selected.items()}
    return ModelSource(directory.name, config, selected, stamps, config_stamp)


def model_file_source(path: Path, input_shape: tuple[int, ...] | None) -> ModelSource:
    """A single TorchScript file; its shape from a ``config.toml`` beside it or ``input_shape``."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    beside = path.parent / "config.toml"
    config_stamp = None
    if input_shape is not None:
        config = ModelConfig(inputs=[TensorSpec(name="input", shape=input_shape)])
    elif beside.is_file():
        config_stamp = stamp(beside)
        config = load_model_config(beside)
    else:
        raise ConfigError(
            f"{path}: the input shape is unknown; put a config.toml beside it or pass "
            "--input-shape (per item, e.g. 3,224,224)"
        )
    return ModelSource(path.stem, config, {1: path}, {1: stamp(path)}, config_stamp)


class Scanner:
    """Reads a repository directory, or one model file, as often as asked.

    Args:
        root: the repository directory; or ``None`` with ``model_file``.
        model_file: one TorchScript file (``--model``).
        input_shape: its per-item shape when no config.toml lies beside it.
    """

    def __init__(
        self,
        root: Path | None = None,
        model_file: Path | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        if (root is None) == (model_file is None):
            raise ValueError("give a repository root or a model file")
        self.root = root
        self.model_file = model_file
        self.input_shape = input_shape

    def scan(self) -> Scan:
        """Every model, or why it cannot be read (one bad model does not hide the others)."""
        result = Scan()
        if self.model_file is not None:
            try:
                source = model_file_source(self.model_file, self.input_shape)
                result.sources[source.name] = source
            except ConfigError as exc:
                result.errors[self.model_file.stem] = exc
            return result
        assert self.root is not None
        if not self.root.is_dir():
            result.errors[""] = ConfigError(f"{self.root}: model repository is not a directory")
            return result
        try:
            children = sorted(self.root.iterdir())
        except OSError as exc:  # unreadable (permissions, a vanished mount): say so, not INTERNAL
            result.errors[""] = ConfigError(f"{self.root}: cannot read the repository: {exc}")
            return result
        for child in children:
            if child.is_dir() and not child.name.startswith("."):
                try:
                    result.sources[child.name] = scan_model_dir(child)
                except (ConfigError, OSError) as exc:
                    result.errors[child.name] = (
                        exc if isinstance(exc, ConfigError) else ConfigError(f"{child}: {exc}")
                    )
        if not result.sources and not result.errors:
            result.errors[""] = ConfigError(
                f"{self.root}: no model directories (expected <model>/config.toml)"
            )
        return result

    def snapshot(self) -> dict[str, Stamp | None]:
        """Stamps of every file that matters, to tell whether anything changed (cheap: stats)."""
        if self.model_file is not None:
            paths = [self.model_file, self.model_file.parent / "config.toml"]
            return {str(p): stamp(p) for p in paths}
        assert self.root is not None
        stamps: dict[str, Stamp | None] = {}
        try:
            models = [c for c in self.root.iterdir() if c.is_dir() and not c.name.startswith(".")]
        except OSError:
            return stamps
        for model in models:
            stamps[str(model / "config.toml")] = stamp(model / "config.toml")
            try:
                versions = [
                    c
                    for c in model.iterdir()
                    if c.is_dir() and c.name.isascii() and c.name.isdigit()
                ]
            except OSError:
                continue
            for version in versions:
                for filename in MODEL_FILES.values():
                    path = version / filename
                    if (found := stamp(path)) is not None:
                        stamps[str(path)] = found
        return stamps
