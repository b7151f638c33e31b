"""``torch.export`` archives (``.pt2``) checked before torch loads them: torch unpickles some parts
of an archive with ``weights_only=False`` (weights and constants stored as pickles, custom and
opaque objects, sample inputs that fail the safe loader) and loads AOTInductor libraries, any of
which runs code chosen by whoever wrote the file. An archive that would need any of them is
refused with a message saying which part; plain tensors and the JSON program load as usual.

TorchScript files and AOTInductor packages (``format = "aoti"``) are another matter:
``torch.jit.load`` runs the model's own code (``__setstate__``, then ``forward``) by design, and
an AOTInductor package is compiled code. See docs/security.md: who may write the
repository may run code in the server.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from torchwire.compat.torch_internals import aoti_load_package, open_archive
from torchwire.errors import ConfigError


def load_exported(path: Path, device: torch.device) -> torch.nn.Module:
    """The archive at ``path`` (checked first: ``check_archive``) as a module on ``device``, the
    tensors its graph creates included: ``.module().to(device)`` moves the weights only, and a
    ``torch.ones(..., device="cpu")`` traced at export stays on the CPU beside them."""
    check_archive(path)
    from torch.export.passes import move_to_device_pass  # torch._dynamo: see check_archive

    return move_to_device_pass(torch.export.load(str(path)), device).module()


def load_aoti(path: Path, device: torch.device) -> Any:
    """The AOTInductor package at ``path`` as a callable on ``device``: the package was compiled
    for one device type, and a package for another fails here or at the warm-up, saying so."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        return aoti_load_package(path, index)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{path}: cannot load the AOTInductor package: {first} (was it made by "
            "torch._inductor.aoti_compile_and_package with torch "
            f"{torch.__version__.split('+')[0]}, for {device.type}?)"
        ) from exc


def check_archive(path: Path) -> None:
    """Raise ``ConfigError`` if loading the archive at ``path`` could run code from it."""

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"{path}: refused: {why}; torch would unpickle or load it as code when loading. "
            "Re-export the model with plain tensors (torch.export.save from torch "
            f"{torch.__version__.split('+')[0]}), or serve it as TorchScript"
        )

    try:
        archive = open_archive(path)
    except Exception as exc:  # not a zip, truncated: torch.export.load would say the same
        raise ConfigError(f"{path}: cannot read exported model: {exc}") from None
    if archive.format_path not in archive.names:
        raise refuse("it is in the older .pt2 layout (before torch 2.8), which is all pickles")
    for name in archive.names:
        if name.endswith("_config.json") and name.startswith("data/"):
            payloads = json.loads(archive.read_string(name)).get("config", {})
            for fqn, meta in payloads.items():
                if meta.get("use_pickle"):
                    raise refuse(f"'{fqn}' is stored as a pickle ({name})")
                if str(meta.get("path_name", "")).startswith(archive.pickled_prefixes):
                    raise refuse(f"constant '{fqn}' is a pickled object ({name})")
        elif name.startswith(archive.aoti_dir):
            raise ConfigError(
                f"{path}: holds AOTInductor compiled code ({name}): serve it with "
                'format = "aoti" in config.toml (loading it runs that code, by design)'
            )
        elif name.startswith(archive.sample_inputs_dir):
            try:
                torch.load(io.BytesIO(archive.read_bytes(name)), weights_only=True)
            except Exception:
                raise refuse(f"its sample inputs ({name}) hold more than tensors") from None
