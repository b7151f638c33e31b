"""Protobuf's wire format, read and written directly where protobuf's objects would copy.

Two users: ``seed_wire`` reads and writes the seed API's small messages without protobuf objects,
and ``v2_codec`` lifts the tensor buffers out of a KServe V2 ``ModelInferRequest`` as views of
the received bytes (``split_field``): protobuf's parser would copy each buffer into its arena,
and reading the field would copy it again, 600 KB twice for one 224x224 image.

Every reader raises ``WireError`` on bytes that are not a valid encoding; callers say which
message it was.
"""

from __future__ import annotations


class WireError(ValueError):
    """Bytes that are not a valid protobuf encoding."""


LENGTH_DELIMITED = 2


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    if pos < len(data) and data[pos] < 0x80:  # one byte: every tag, most lengths
        return data[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def tag(data: bytes, pos: int) -> tuple[int, int]:
    """The field tag at ``pos`` and the position after it. WireError for a tag no field can
    have (field number 0, or 2^29 and up), which protobuf refuses too."""
    if pos < len(data) and 0x08 <= data[pos] < 0x80:  # one byte: fields 1 to 15
        return data[pos], pos + 1
    value, end = varint(data, pos)
    if value >> 3 == 0:
        raise WireError("field number 0")
    if value >> 32:
        raise WireError("field number 2^29 or more")
    return value, end


def delimited(data: bytes, pos: int) -> tuple[int, int]:
    """Start and end of the length-delimited payload whose length is at ``pos``."""
    length, pos = varint(data, pos)
    end = pos + length
    if end > len(data):
        raise WireError(f"a field of {length} bytes runs past the end of the message")
    return pos, end


def skip(data: bytes, pos: int, wire_type: int) -> int:
    """The position after a field of ``wire_type`` whose payload starts at ``pos``."""
    if wire_type == 0:
        end = varint(data, pos)[1]
    elif wire_type == 1:
        end = pos + 8
    elif wire_type == LENGTH_DELIMITED:
        end = delimited(data, pos)[1]
    elif wire_type == 5:
        end = pos + 4
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if end > len(data):
        raise WireError("truncated field")
    return end


def split_field(
    data: bytes, number: int, max_other_fields: int = 64
) -> tuple[bytes, list[memoryview]] | None:
    """The message without field ``number`` (length-delimited, repeated), and that field's
    payloads as views of ``data``, in order. Protobuf reads the rest as it would have read the
    whole message: the other fields keep their bytes and their order.

    None if the message has more than ``max_other_fields`` other fields: stepping over each in
    Python would cost more than protobuf's copies (a message of a million tiny fields is read by
    protobuf 50 times faster). WireError where this reader stops; protobuf may still read it
    (groups, which this reader does not step over)."""
    wanted = (number << 3) | LENGTH_DELIMITED
    view = memoryview(data)
    found: list[memoryview] = []
    kept: list[memoryview] = []
    pos = kept_from = others = 0
    size = len(data)
    while pos < size:
        field_start = pos
        field_tag, pos = tag(data, pos)
        if pos - field_start > 5:
            raise WireError("a tag longer than 5 bytes")
        if field_tag == wanted:
            start, pos = delimited(data, pos)
            found.append(view[start:pos])
            if field_start > kept_from:
                kept.append(view[kept_from:field_start])
            kept_from = pos
        else:
            others += 1
            if others > max_other_fields:
                return None
            pos = skip(data, pos, field_tag & 7)
    if not found:
        return data, found
    if kept_from < size:
        kept.append(view[kept_from:])
    return b"".join(kept), found


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_prefix(number: int, size: int) -> bytes:
    """The tag and length that go before a length-delimited field of ``size`` bytes."""
    return encode_varint((number << 3) | LENGTH_DELIMITED) + encode_varint(size)
