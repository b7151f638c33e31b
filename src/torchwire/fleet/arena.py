"""The shared memory between a worker and an engine: one anonymous file (memfd) per worker
connection, created by the worker, mapped by both, handed over with the socket's first message.

The worker writes each request's inputs into a slot of it and reserves room behind them for the
answer; the engine reads the inputs in place (no copy) and writes the answer there. Slots are
taken from a ring: requests to an engine finish roughly in order, so freeing the oldest slots
lets the ring go round; one that finishes early is marked and freed when the ones before it are.
The ring goes back to the front as soon as the front has room, so that it spans what is in
flight rather than the whole file.
When the ring has no room (the oldest request is slow), a request goes inline in its message.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

ALIGN = 64
"""Slot offsets are cache-line aligned, so that tensors made on them are too."""


def aligned(size: int) -> int:
    """``size`` rounded up to a multiple of ``ALIGN``: what a tensor takes in a slot."""
    return -(-size // ALIGN) * ALIGN


@dataclass(slots=True)
class _Slot:
    offset: int
    size: int
    freed: bool = False


class Arena:
    """A mapped memfd of ``size`` bytes and the ring of slots taken from it.

    ``Arena.create`` makes one (the worker's side); ``Arena.attach`` maps one received as a file
    descriptor (the engine's side), which never allocates from it.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buffer = mmap.mmap(fd, size)
        self._slots: deque[_Slot] = deque()
        self._by_offset: dict[int, _Slot] = {}
        self._head = 0  # where the next slot starts
        self._lock = threading.Lock()

    @classmethod
    def create(cls, size: int, name: str = "torchwire-engine") -> Arena:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)  # pages are backed only once written
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> Arena:
        return cls(fd, os.fstat(fd).st_size)

    def allocate(self, size: int) -> int | None:
        """The offset of a free slot of ``size`` bytes, or None when the ring has no room."""
        size = max(ALIGN, aligned(size))
        with self._lock:
            if not self._slots:
                self._head = 0
                start = 0 if size <= self.size else None
            else:
                first, head = self._slots[0].offset, self._head
                if head > first:  # in use: [first, head); free: [head, end) and [0, first)
                    # The front first when it has room: the ring stays as small as what is in
                    # flight, on pages both processes have touched already (no page faults).
                    start = 0 if first >= size else (head if self.size - head >= size else None)
                else:  # wrapped: in use [first, end) and [0, head); free: [head, first)
                    start = head if first - head >= size else None
            if start is None:
                return None
            slot = _Slot(start, size)
            self._slots.append(slot)
            self._by_offset[start] = slot
            self._head = start + size
            return start

    def free(self, offset: int) -> None:
        """Give a slot back; the ring moves past every freed slot at its tail."""
        with self._lock:
            slot = self._by_offset.pop(offset, None)
            if slot is None:
                return
            slot.freed = True
            while self._slots and self._slots[0].freed:
                self._slots.popleft()

    def in_use(self) -> int:
        """Slots taken and not yet freed."""
        return len(self._by_offset)

    def view(
        self, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int
    ) -> np.ndarray[Any, Any]:
        """An array on the arena's bytes at ``offset`` (no copy)."""
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.buffer, dtype, count, offset).reshape(shape)

    def write(self, array: np.ndarray[Any, Any], offset: int) -> None:
        """Copy ``array`` to ``offset`` (the one copy a tensor makes between processes)."""
        np.copyto(self.view(array.dtype, array.shape, offset), array, casting="no")

    def close(self) -> None:
        """Unmap if nothing views the memory any more (else the map goes with its last view),
        and close the file."""
        with contextlib.suppress(BufferError):
            self.buffer.close()
        os.close(self.fd)
