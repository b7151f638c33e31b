"""The seed API's messages read and written at the wire level, without protobuf objects.

``PredictRequest`` and ``PredictResponse`` are tiny (a packed float array, a string map, bytes,
two integers), and their floats are little-endian float32 on the wire exactly as numpy holds them.
Reading the bytes directly lets ``inputs`` become an array with one zero-copy ``np.frombuffer``
instead of a Python float per element (16 ms for one 3x224x224 image through ``repeated float``),
and writing ``outputs`` is one ``tobytes``. The layout is that of
``proto/modelservice_messages.proto``; tests check it against protobuf's own parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from torchwire._proto.modelservice_messages_pb2 import PredictRequest
from torchwire.errors import InvalidInputError
from torchwire.server.codecs.wire import WireError, delimited, encode_varint, skip, tag

FLOAT32_LE = np.dtype("<f4")

# (field number << 3) | wire type
_INPUTS_PACKED = 0x0A  # 1, length-delimited
_INPUTS_SINGLE = 0x0D  # 1, fixed32 (a writer that does not pack)
_METADATA = 0x12  # 2, length-delimited map entry
_RAW_INPUTS = 0x1A  # 3, length-delimited


@dataclass(slots=True)
class SeedRequest:
    """A decoded ``PredictRequest``: exactly one of ``floats``/``raw`` may be non-empty."""

    floats: np.ndarray[Any, Any]
    raw: bytes | memoryview
    metadata: dict[str, str] = field(default_factory=dict)


def _malformed(why: str) -> InvalidInputError:
    return InvalidInputError(f"malformed PredictRequest: {why}")


_ENTRIES: dict[bytes, tuple[str, str] | None] = {}
"""Metadata entries already read, by their bytes: a client sends the same few (the model's name)
in every request, and reading one costs more than the rest of the message."""
_ENTRIES_MAX = 1024
_UNREAD = ("", "")


def _cached_entry(data: bytes, start: int, end: int) -> tuple[str, str] | None:
    raw = data[start:end]
    entry = _ENTRIES.get(raw, _UNREAD)
    if entry is _UNREAD:
        entry = _map_entry(data, start, end)
        if len(_ENTRIES) >= _ENTRIES_MAX:  # a client sending a new entry every time
            _ENTRIES.clear()
        _ENTRIES[raw] = entry
    return entry


def _map_entry(data: bytes, start: int, end: int) -> tuple[str, str] | None:
    """An entry's key and value; None for one that protobuf drops (it has another field)."""
    key = value = b""
    kept = True
    pos = start
    while pos < end:
        field, pos = tag(data, pos)
        if field in (0x0A, 0x12):
            begin, pos = delimited(data, pos)
            if field == 0x0A:
                key = data[begin:pos]
            else:
                value = data[begin:pos]
        else:
            kept = False
            pos = skip(data, pos, field & 7)
        if pos > end:
            raise _malformed("a metadata entry runs past its end")
    if not kept:
        return None
    try:
        return key.decode(), value.decode()
    except UnicodeDecodeError:
        raise _malformed("metadata is not valid UTF-8") from None


MAX_FIELDS = 64
"""A request with more fields than this (a writer that does not pack its floats, or a hostile
one) is read by protobuf, which steps over a million small fields in 20 ms where this reader
takes 0.9 s, on the event loop."""


class _ManyFields(Exception):
    pass


def parse_request(data: bytes) -> SeedRequest:
    """Decode a serialized ``PredictRequest``; later fields win, as protobuf's parser does."""
    try:
        return _parse(data)
    except WireError as exc:
        raise _malformed(str(exc)) from None
    except _ManyFields:
        return _parse_with_protobuf(data)


def _parse_with_protobuf(data: bytes) -> SeedRequest:
    try:
        message = PredictRequest.FromString(data)
    except DecodeError as exc:
        raise _malformed(str(exc)) from None
    return SeedRequest(
        np.array(message.inputs, FLOAT32_LE), message.raw_inputs, dict(message.metadata)
    )


def _parse(data: bytes) -> SeedRequest:
    chunks: list[np.ndarray[Any, Any]] = []
    raw: bytes | memoryview = b""
    metadata: dict[str, str] = {}
    view = memoryview(data)
    pos, size, fields = 0, len(data), 0
    while pos < size:
        fields += 1
        if fields > MAX_FIELDS:
            raise _ManyFields
        field, pos = tag(data, pos)
        if field == _INPUTS_PACKED:
            start, pos = delimited(data, pos)
            if (pos - start) % 4:
                raise _malformed("packed inputs are not a whole number of floats")
            chunks.append(np.frombuffer(data, FLOAT32_LE, (pos - start) // 4, start))
        elif field == _INPUTS_SINGLE:
            if pos + 4 > size:
                raise _malformed("truncated float")
            chunks.append(np.frombuffer(data, FLOAT32_LE, 1, pos))  # unpacked: rare
            pos += 4
        elif field == _METADATA:
            start, pos = delimited(data, pos)
            entry = _cached_entry(data, start, pos)
            if entry is not None:
                metadata[entry[0]] = entry[1]
        elif field == _RAW_INPUTS:
            start, pos = delimited(data, pos)
            raw = view[start:pos]
        else:
            pos = skip(data, pos, field & 7)
    if not chunks:
        floats = np.empty(0, FLOAT32_LE)
    elif len(chunks) == 1:
        floats = chunks[0]
    else:
        floats = np.concatenate(chunks)
    return SeedRequest(floats, raw, metadata)


def encode_response(flat: np.ndarray[Any, Any], raw: bool, elapsed_s: float) -> bytes:
    """A serialized ``PredictResponse``: the floats (packed, or raw bytes) and the server time."""
    # A view of the floats, copied once, by the join (tobytes() would copy them first).
    payload = np.ascontiguousarray(flat, FLOAT32_LE).data.cast("B")
    prefix = b"\x1a" if raw else b"\x0a"  # raw_outputs = 3, or packed outputs = 1
    parts: list[bytes | memoryview] = (
        [prefix, encode_varint(len(payload)), payload] if payload else []
    )
    millis, micros = round(elapsed_s * 1e3), round(elapsed_s * 1e6)
    if millis:
        parts += [b"\x10", encode_varint(millis)]  # processing_time_ms = 2
    if micros:
        parts += [b"\x20", encode_varint(micros)]  # processing_time_us = 4
    return b"".join(parts)
