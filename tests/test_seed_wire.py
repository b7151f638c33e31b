"""torchwire reads and writes the seed messages at the wire level: it must agree with protobuf."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import ServerThread
from torchwire._proto.modelservice_messages_pb2 import PredictRequest, PredictResponse
from torchwire.errors import InvalidInputError
from torchwire.server.codecs import seed_wire
from torchwire.server.codecs.seed_wire import encode_response, parse_request

floats32 = st.floats(width=32, allow_nan=False)
text = st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    inputs=st.lists(floats32, max_size=300),
    metadata=st.dictionaries(text, text, max_size=4),
    raw=st.binary(max_size=64),
)
def test_parse_agrees_with_protobuf(
    inputs: list[float], metadata: dict[str, str], raw: bytes
) -> None:
    data = PredictRequest(inputs=inputs, metadata=metadata, raw_inputs=raw).SerializeToString()
    parsed = parse_request(data)
    np.testing.assert_array_equal(parsed.floats, np.array(inputs, dtype=np.float32))
    assert parsed.metadata == metadata
    assert bytes(parsed.raw) == raw


def test_unpacked_and_split_floats_and_unknown_fields_are_read_as_protobuf_does() -> None:
    # inputs written unpacked (fixed32 each), then a packed chunk, then an unknown varint field 9
    unpacked = b"".join(b"\x0d" + np.float32(v).tobytes() for v in (1.0, 2.0))
    packed = b"\x0a\x08" + np.array([3.0, 4.0], "<f4").tobytes()
    data = unpacked + packed + b"\x48\x96\x01"
    assert list(PredictRequest.FromString(data).inputs) == [1.0, 2.0, 3.0, 4.0]
    assert parse_request(data).floats.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_request_of_many_fields_is_read_by_protobuf_with_the_same_result() -> None:
    # A writer that does not pack 300 floats, metadata, raw bytes and unknown fields: more
    # fields than the wire reader steps over in Python (seed_wire.MAX_FIELDS).
    floats = np.arange(300, dtype="<f4")
    unpacked = b"".join(b"\x0d" + value.tobytes() for value in floats)
    data = (
        PredictRequest(metadata={"model": "m"}, raw_inputs=b"\x01\x02").SerializeToString()
        + unpacked
        + b"\x48\x96\x01" * 10
    )
    expected = PredictRequest.FromString(data)
    parsed = parse_request(data)
    assert parsed.floats.dtype == np.float32
    np.testing.assert_array_equal(parsed.floats, np.array(expected.inputs, np.float32))
    assert parsed.metadata == {"model": "m"} and bytes(parsed.raw) == b"\x01\x02"
    with pytest.raises(InvalidInputError, match="malformed PredictRequest"):
        parse_request(data + b"\x0a\x05\x00")  # a packed chunk cut short, after them


@pytest.mark.parametrize(
    "entry",
    [
        b"\x0a\x05model\x12\x06recsys",  # key, value
        b"\x0a\x05model\x12\x06recsys\x18\x01",  # and an unknown field: protobuf drops it
        b"\x0a\x05model\x10\x01\x12\x06recsys",  # a value of the wrong wire type: dropped
        b"\x0a\x05model\x12\x06recsys\x0a\x01x",  # the key again: the last one wins
    ],
)
@pytest.mark.parametrize("padding", [0, seed_wire.MAX_FIELDS + 1], ids=["wire", "protobuf"])
def test_odd_metadata_entries_are_read_as_protobuf_reads_them(entry: bytes, padding: int) -> None:
    # With few fields the wire reader reads the message, with many protobuf does: the same
    # entry must name the same model either way.
    data = b"\x78\x00" * padding + b"\x12" + bytes([len(entry)]) + entry
    assert parse_request(data).metadata == dict(PredictRequest.FromString(data).metadata)


def test_metadata_that_changes_every_request_is_read_right_in_bounded_memory() -> None:
    """Metadata entries are remembered by their bytes (the model's name comes in every request);
    a client sending a new value each time gets each read right, and the memory stays bounded."""
    for i in range(3 * seed_wire._ENTRIES_MAX):
        metadata = {"model": "recsys", "request-id": str(i)}
        data = PredictRequest(inputs=[1.0], metadata=metadata).SerializeToString()
        assert parse_request(data).metadata == metadata
    assert len(seed_wire._ENTRIES) <= seed_wire._ENTRIES_MAX
    bad = b"\x12\x04\x0a\x02\xff\xfe"  # not UTF-8: refused every time, never remembered
    for _ in range(2):
        with pytest.raises(InvalidInputError, match="not valid UTF-8"):
            parse_request(bad)


@settings(max_examples=200, deadline=None)
@given(outputs=st.lists(floats32, max_size=100), raw=st.booleans(), elapsed=st.floats(0, 100))
def test_encoded_responses_parse_with_protobuf(
    outputs: list[float], raw: bool, elapsed: float
) -> None:
    flat = np.array(outputs, dtype=np.float32)
    response = PredictResponse.FromString(encode_response(flat, raw, elapsed))
    got = (
        np.frombuffer(response.raw_outputs, "<f4")
        if raw
        else np.array(response.outputs, np.float32)
    )
    np.testing.assert_array_equal(got, flat)
    assert response.processing_time_ms == round(elapsed * 1e3)
    assert response.processing_time_us == round(elapsed * 1e6)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x0a\x05\x00\x00\x00\x00\x00", "not a whole number of floats"),
        (b"\x0a\x10\x00", "runs past the end"),
        (b"\x1a\xff", "truncated varint"),
        (b"\x12\x04\x0a\x02\xff\xfe", "not valid UTF-8"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x80\x80\x80\x80\x10\x00", "field number 2\\^29 or more"),
    ],
)
def test_malformed_bytes_are_invalid_input(data: bytes, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why):
        parse_request(data)


def test_malformed_bytes_over_the_wire_get_invalid_argument(repo_server: ServerThread) -> None:
    with grpc.insecure_channel(repo_server.target) as channel:
        predict = channel.unary_unary("/ModelService/Predict")
        with pytest.raises(grpc.RpcError) as caught:
            predict(b"\x0a\x10\x00", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed PredictRequest" in caught.value.details()
        # and the server goes on serving
        ok = predict(PredictRequest(inputs=[1, 2, 3, 4]).SerializeToString(), timeout=10)
        assert list(PredictResponse.FromString(ok).outputs) == [3, 6, 9, 12]


def test_a_strided_or_big_endian_output_is_sent_as_little_endian_floats() -> None:
    column = np.arange(70, dtype=">f4").reshape(10, 7)[:, 2]  # a view: strided, big-endian
    for raw in (True, False):
        response = PredictResponse.FromString(encode_response(column, raw, 0.0))
        got = np.frombuffer(response.raw_outputs, "<f4") if raw else np.array(response.outputs)
        assert got.tolist() == column.tolist()
