"""KServe V2 / Triton system shared memory: regions of ``/dev/shm`` that a client on the same
machine registers by name, then names in a request instead of sending the tensor's bytes (an input
is read from the region, an output written into it).

Only with ``--allow-client-shm``. A region is the caller's memory, so it is held to: a plain name
in ``/dev/shm`` (no other directory, no link), a regular file owned by this server's user, and an
offset and size inside the file. What a request names must lie inside its region.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from torchwire.errors import InvalidInputError, PermissionDeniedError, TorchwireError

SHM_DIR = Path("/dev/shm")
_KEY = re.compile(r"^/?([A-Za-z0-9][A-Za-z0-9._-]{0,254})$")
MAX_REGIONS = 1024


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapped: mmap.mmap
    view: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapped)[self.offset : self.offset + self.byte_size]

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a request still reads it: closed once it lets go
            self.view.release()
            self.mapped.close()


class Regions:
    """The registered regions of this process (registration runs on the event loop; requests
    read them from any thread)."""

    def __init__(self, allowed: bool, directory: Path = SHM_DIR) -> None:
        self.allowed = allowed
        self._directory = directory
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the file ``key`` in /dev/shm as ``name``.

        Raises:
            PermissionDeniedError: shared memory is off, or the file is another user's.
            InvalidInputError: a bad name, key, offset or size, or a name already registered.
        """
        self._check_allowed()
        if not name:
            raise InvalidInputError("a shared memory region needs a name")
        found = _KEY.match(key)
        if found is None or found.group(1) in (".", ".."):
            raise InvalidInputError(
                f"shared memory key {key!r} must name a file directly in {self._directory} "
                "(letters, digits, '.', '_', '-'; an optional leading '/')"
            )
        if offset < 0 or byte_size <= 0:
            raise InvalidInputError(
                f"region {name!r}: offset must be >= 0 and byte_size > 0, got {offset} and "
                f"{byte_size}"
            )
        path = self._directory / found.group(1)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInputError(f"region {name!r}: no shared memory {key!r}") from None
        except OSError as exc:
            raise InvalidInputError(f"region {name!r}: cannot open {key!r}: {exc}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(f"region {name!r}: {key!r} is not a shared memory file")
            if info.st_uid != os.geteuid():
                raise PermissionDeniedError(
                    f"region {name!r}: {key!r} belongs to another user; only this server's "
                    "user's shared memory can be registered"
                )
            if offset + byte_size > info.st_size:
                raise InvalidInputError(
                    f"region {name!r}: offset {offset} + byte_size {byte_size} is beyond the "
                    f"{info.st_size} bytes of {key!r}"
                )
            mapped = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        with self._lock:
            if name in self._regions:
                mapped.close()
                raise InvalidInputError(f"shared memory region {name!r} is registered already")
            if len(self._regions) >= MAX_REGIONS:
                mapped.close()
                raise TorchwireError(
                    f"{MAX_REGIONS} shared memory regions are registered: unregister some",
                    code="RESOURCE_EXHAUSTED",
                )
            self._regions[name] = Region(name, key, offset, byte_size, mapped)

    def unregister(self, name: str = "") -> None:
        """Forget ``name``, or every region when it is empty (unknown names are no error, as
        Triton has it)."""
        self._check_allowed()
        with self._lock:
            names = [name] if name else list(self._regions)
            gone = [self._regions.pop(n) for n in names if n in self._regions]
        for region in gone:
            region.close()

    def status(self, name: str = "") -> list[dict[str, object]]:
        """The regions (or ``name`` alone) as V2 reports them."""
        with self._lock:
            if name and name not in self._regions:
                raise InvalidInputError(f"no shared memory region {name!r} is registered")
            regions = [self._regions[name]] if name else list(self._regions.values())
        return [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in regions
        ]

    def view(self, name: str, offset: int, byte_size: int, where: str) -> memoryview:
        """``byte_size`` bytes at ``offset`` of region ``name`` (for ``where``, an input or
        output named in errors)."""
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            off = "" if self.allowed else " (shared memory is off: --allow-client-shm)"
            raise InvalidInputError(f"{where}: no shared memory region {name!r} is registered{off}")
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise InvalidInputError(
                f"{where}: offset {offset} + byte_size {byte_size} is beyond region {name!r} "
                f"({region.byte_size} bytes)"
            )
        return region.view[offset : offset + byte_size]

    def close(self) -> None:
        with self._lock:
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            region.close()

    def _check_allowed(self) -> None:
        if not self.allowed:
            raise PermissionDeniedError(
                "system shared memory is off: start the server with --allow-client-shm"
            )
