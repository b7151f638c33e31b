"""Which engines a server needs, read from the model configs alone (no torch: the supervisor and
the CLI decide before any model loads)."""

from __future__ import annotations

from pathlib import Path

from torchwire.config import ModelConfig, ServerSettings, load_model_config
from torchwire.errors import ConfigError

_CPU = ModelConfig.model_validate({"inputs": [{"name": "x", "shape": [1]}]})
"""What an engine decision reads of a model without a config.toml: a CPU model."""


def _configs(settings: ServerSettings) -> list[ModelConfig]:
    """The configs of the models on disk that can be read (the others fail at load, saying why)."""
    if settings.model is not None:
        paths = [settings.model.parent / "config.toml"]
    elif settings.repository is not None:
        paths = sorted(Path(settings.repository).glob("*/config.toml"))
    else:
        return [
            ModelConfig.model_validate({"inputs": [{"name": "x", "shape": [1]}]})
        ]  # the demo: CPU
    configs = []
    for path in paths:
        try:
            configs.append(load_model_config(path))
        except (ConfigError, OSError):
            continue
    if not configs and settings.model is not None:  # a lone file without config: CPU
        configs.append(_CPU)
    return configs


def device_key(device: str) -> str:
    """One name per device: ``cuda`` is ``cuda:0``."""
    return "cuda:0" if device == "cuda" else device


def engine_devices(settings: ServerSettings) -> list[str]:
    """The devices that get an engine: those of the models an engine takes."""
    configs = _configs(settings)
    return sorted({device_key(c.instances.device) for c in configs if settings.engine_wanted(c)})
