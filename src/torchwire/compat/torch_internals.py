"""What torchwire uses of torch beyond its stable API: AOTInductor's packaging (public
functions of a private module), the layout of a ``.pt2`` archive (to check it before torch
unpickles anything), and numpy's warning about read-only arrays handed to torch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def aoti_load_package(path: Path, device_index: int = -1) -> Any:
    """An AOTInductor package as a callable (``torch._inductor.aoti_load_package``)."""
    return torch._inductor.aoti_load_package(str(path), device_index=device_index)


def aoti_compile_and_package(program: Any, path: Path) -> None:
    """Compile an exported program into an AOTInductor package at ``path`` (needs a C++
    compiler); torch 2.13's own use of a deprecated pytree name is not the caller's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


@dataclass(frozen=True)
class Archive:
    """The entries of a ``.pt2`` archive and the names torch gives its parts."""

    names: list[str]
    reader: Any  # torch.export.pt2_archive.PT2ArchiveReader
    format_path: str
    aoti_dir: str
    sample_inputs_dir: str
    pickled_prefixes: tuple[str, ...]

    def read_string(self, name: str) -> str:
        return str(self.reader.read_string(name))

    def read_bytes(self, name: str) -> bytes:
        return bytes(self.reader.read_bytes(name))


def open_archive(path: Path) -> Archive:
    """Read the table of contents of the archive at ``path`` (raises as torch does on a file
    that is not one). Imported here: ``torch.export.pt2_archive`` pulls in ``torch._dynamo``,
    1.4 s of a start-up, which only ``.pt2`` models need."""
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive.constants import (
        AOTINDUCTOR_DIR,
        ARCHIVE_FORMAT_PATH,
        CUSTOM_OBJ_FILENAME_PREFIX,
        OPAQUE_OBJ_FILENAME_PREFIX,
        SAMPLE_INPUTS_DIR,
    )

    reader = PT2ArchiveReader(str(path))
    return Archive(
        names=list(reader.get_file_names()),
        reader=reader,
        format_path=ARCHIVE_FORMAT_PATH,
        aoti_dir=AOTINDUCTOR_DIR,
        sample_inputs_dir=SAMPLE_INPUTS_DIR,
        pickled_prefixes=(CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX),
    )


def quiet_readonly_arrays() -> None:
    """Silence torch's warning on read-only numpy arrays: requests' arrays are views of the
    received bytes, which torch only reads (``torch.cat``). Called when the first model loads,
    not at import: importing torchwire leaves the process's warning filters alone."""
    warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)


def jit_executor_settings() -> tuple[bool, bool]:
    """TorchScript's tensor-expression fuser and graph executor optimisation: on or off (the
    GPU benchmark measures the model with each turned off)."""
    return bool(torch._C._jit_texpr_fuser_enabled()), bool(torch._C._get_graph_executor_optimize())


def set_jit_executor(fuser: bool, optimize: bool) -> None:
    """Set what ``jit_executor_settings`` reads."""
    torch._C._jit_set_texpr_fuser_enabled(fuser)
    torch._C._set_graph_executor_optimize(optimize)
