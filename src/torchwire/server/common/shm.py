"""KServe V2 / Triton system shared memory: regions of ``/dev/shm`` that a client on the same
machine registers by name, then names in a request instead of sending the tensor's bytes (an input
is read from the region, an output written into it).

Only with ``--allow-client-shm``. A region is the caller's memory, so it is held to: a plain name
in ``/dev/shm`` (no other directory, no link), a regular file owned by this server's user, and an
offset and size inside the file. What a request names must lie inside its region.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchwire.errors import InvalidInputError, PermissionDeniedError, TorchwireError

SHM_DIR = Path("/dev/shm")
_KEY = re.compile(r"/?([A-Za-z0-9][A-Za-z0-9._-]{0,254})")
MAX_REGIONS = 1024


@dataclass(eq=False)
class Region:
    """A registered region: the file, kept open, read and written with pread/pwrite (not mapped:
    a mapped file that shrinks, or a full /dev/shm, would kill the process with SIGBUS)."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # the fd is not closed mid-read
    closed: bool = False

    def read(self, offset: int, size: int, where: str) -> np.ndarray[Any, Any]:
        """``size`` bytes at ``offset`` of the region, copied into a new array."""
        data = np.empty(size, dtype=np.uint8)
        with self.lock:
            if self.closed:
                raise InvalidInputError(f"{where}: shared memory region {self.name!r} is gone")
            got = os.preadv(self.fd, [data.data], self.offset + offset)
        if got != size:
            raise InvalidInputError(
                f"{where}: region {self.name!r} holds {got} of the {size} bytes asked for "
                "(its file shrank)"
            )
        return data

    def write(self, offset: int, data: memoryview, where: str) -> None:
        with self.lock:
            if self.closed:
                raise InvalidInputError(f"{where}: shared memory region {self.name!r} is gone")
            if os.fstat(self.fd).st_size < self.offset + offset + len(data):
                raise InvalidInputError(f"{where}: region {self.name!r}'s file shrank")
            try:
                os.pwrite(self.fd, data, self.offset + offset)
            except OSError as exc:  # ENOSPC: /dev/shm is full
                raise TorchwireError(
                    f"{where}: cannot write into region {self.name!r}: {exc.strerror}",
                    code="RESOURCE_EXHAUSTED",
                ) from None

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)


class Regions:
    """The registered regions of this process (registration runs on the event loop; requests
    read them from any thread). With ``--workers``, every worker holds the same regions: the
    supervisor registers each on all of them (``plane.control``)."""

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
        found = _KEY.fullmatch(key)
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
        except BaseException:
            os.close(fd)
            raise
        region = Region(name, key, offset, byte_size, fd)
        with self._lock:
            if name in self._regions or len(self._regions) >= MAX_REGIONS:
                region.close()
                if name in self._regions:
                    raise InvalidInputError(f"shared memory region {name!r} is registered already")
                raise TorchwireError(
                    f"{MAX_REGIONS} shared memory regions are registered: unregister some",
                    code="RESOURCE_EXHAUSTED",
                )
            self._regions[name] = region

    def ensure(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Register ``name`` unless this very region is registered already: a worker of
        several, told of its fleet's regions (one may be the worker's own, or a stale one)."""
        with self._lock:
            found = self._regions.get(name)
        if found is not None:
            if (found.key, found.offset, found.byte_size) == (key, offset, byte_size):
                return
            self.unregister(name)
        self.register(name, key, offset, byte_size)

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

    def _find(self, name: str, offset: int, byte_size: int, where: str) -> Region:
        """The region ``name``, with ``byte_size`` bytes at ``offset`` inside it."""
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
        return region

    def check(self, name: str, offset: int, byte_size: int, where: str) -> None:
        """Raise unless ``byte_size`` bytes at ``offset`` of region ``name`` can be had (before a
        model computes what goes there)."""
        self._find(name, offset, byte_size, where)

    def read(self, name: str, offset: int, byte_size: int, where: str) -> np.ndarray[Any, Any]:
        """``byte_size`` bytes at ``offset`` of region ``name`` (``where``: the input named in
        errors), as a new array of bytes."""
        return self._find(name, offset, byte_size, where).read(offset, byte_size, where)

    def write(self, name: str, offset: int, byte_size: int, data: memoryview, where: str) -> None:
        """``data`` into region ``name`` at ``offset``; it must fit in ``byte_size``."""
        if len(data) > byte_size:
            raise InvalidInputError(
                f"{where} takes {len(data)} bytes; its shared memory ({name!r} at {offset}) "
                f"gives {byte_size}"
            )
        self._find(name, offset, byte_size, where).write(offset, data, where)

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
