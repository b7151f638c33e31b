"""What a worker and an engine say to each other on the engine's Unix socket, in one place.

Each message is a tuple, pickled (protocol 5) behind a 4-byte length. Both ends are this
package's processes of one user, on a socket in a directory only that user can enter; tensors
travel through the connection's ``Arena``, not in the messages, except where the ring is full,
the tensor holds objects (BYTES) or the answer's size is not known in advance.

Worker to engine:
    ``("hello", worker)``, carrying the arena's file descriptor: the connection's first message.
    ``("load", rid, name, version, path, config, key)``: hold this model version (once for all
    workers that ask); answered ``("loaded", rid, handle, config, cost, pid)`` (the config
    as the engine runs it: outputs found at load, inference threads) or
    ``("failed", rid, code, message)``.
    ``("release", handle)``: this worker no longer serves it.
    ``("infer", rid, handle, items, deadline, inputs, out_offset, out_bytes)``: one request;
    answered ``("ok", rid, outputs, engine_s, queued)`` or ``("err", rid, code, message,
    metadata)``.

A tensor is ``("shm", dtype, shape, offset)`` in the arena or ``("inline", array)``.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import struct
import threading
from typing import Any

import numpy as np

from torchwire.fleet.arena import Arena

Message = tuple[Any, ...]
Tensor = tuple[Any, ...]

_LENGTH = struct.Struct("<I")
_READ_SIZE = 1 << 16


class Channel:
    """One end of an engine connection: whole messages out (from any thread) and in (from one
    reader thread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._pending = bytearray()

    def send(self, message: Message, fds: list[int] | None = None) -> None:
        """Send one message; raises ``OSError`` when the other end is gone."""
        payload = pickle.dumps(message, protocol=5)
        frame = _LENGTH.pack(len(payload)) + payload
        with self._send_lock:
            if fds:
                sent = socket.send_fds(self.sock, [frame], fds)
                if sent < len(frame):
                    self.sock.sendall(frame[sent:])
            else:
                self.sock.sendall(frame)

    def receive(self) -> list[Message]:
        """The messages that arrived, at least one (waits for it); raises ``EOFError`` when the
        other end closed."""
        messages: list[Message] = []
        while not messages:
            chunk = self.sock.recv(_READ_SIZE)
            if not chunk:
                raise EOFError("the other end closed the connection")
            self._pending += chunk
            messages = self._complete()
        return messages

    def receive_fds(self) -> tuple[Message, list[int]]:
        """The first message and the file descriptors it carries."""
        data, fds, _, _ = socket.recv_fds(self.sock, _READ_SIZE, 4)
        if not data:
            raise EOFError("the other end closed the connection")
        self._pending += data
        while not (messages := self._complete()):
            chunk = self.sock.recv(_READ_SIZE)
            if not chunk:
                raise EOFError("the other end closed the connection")
            self._pending += chunk
        if len(messages) != 1:
            raise ValueError("the first message must come alone")
        return messages[0], fds

    def _complete(self) -> list[Message]:
        messages: list[Message] = []
        buffer, at = self._pending, 0
        while len(buffer) - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, at)
            end = at + _LENGTH.size + size
            if len(buffer) < end:
                break
            messages.append(pickle.loads(buffer[at + _LENGTH.size : end]))
            at = end
        if at:
            del buffer[:at]
        return messages

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def put_tensor(arena: Arena | None, array: np.ndarray[Any, Any], offset: int) -> Tensor:
    """``array`` written to ``arena`` at ``offset`` (-1: no room), or inline."""
    if arena is None or offset < 0 or array.dtype.hasobject:
        return ("inline", array)
    arena.write(array, offset)
    return ("shm", array.dtype.str, array.shape, offset)


def get_tensor(arena: Arena, tensor: Tensor) -> np.ndarray[Any, Any]:
    """The array a ``Tensor`` names: a view of the arena, or the inline array."""
    if tensor[0] == "inline":
        array: np.ndarray[Any, Any] = tensor[1]
        return array
    _, dtype, shape, offset = tensor
    return arena.view(np.dtype(dtype), shape, offset)
