"""A large V2 request's tensor buffers are lifted out at the wire level, and its answer's written
there: both must agree with protobuf, whatever order the fields come in."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf import message as pb_message
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from support import ServerThread
from torchwire.errors import InvalidInputError
from torchwire.server.codecs.v2_codec import SPLIT_BYTES, parse_infer, stream_answer
from torchwire.server.codecs.wire import WireError, split_field

RAW = 7  # ModelInferRequest.raw_input_contents
text = st.text(max_size=12)
pieces = st.one_of(
    st.builds(lambda raw: pb.ModelInferRequest(raw_input_contents=[raw]), st.binary(max_size=40)),
    st.builds(lambda name: pb.ModelInferRequest(model_name=name), text),
    st.builds(lambda id_: pb.ModelInferRequest(id=id_), text),
    st.builds(
        lambda name, shape: pb.ModelInferRequest(
            inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=shape)]
        ),
        text,
        st.lists(st.integers(-1, 2**40), max_size=4),
    ),
    st.builds(
        lambda key, value: pb.ModelInferRequest(
            parameters={key: pb.InferParameter(string_param=value)}
        ),
        text,
        text,
    ),
    st.builds(
        lambda name: pb.ModelInferRequest(
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=name)]
        ),
        text,
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=10), st.binary(max_size=8))
def test_split_reads_every_field_order_as_protobuf_does(
    parts: list[pb.ModelInferRequest], unknown: bytes
) -> None:
    # Serialized messages concatenated are one message (repeated fields appended, the last
    # scalar winning): raw buffers land before, between and after the other fields. An unknown
    # field 99 is kept for protobuf too.
    field_99 = b"\x9a\x06" + bytes([len(unknown)]) + unknown
    data = b"".join(p.SerializeToString() for p in parts) + field_99
    expected = pb.ModelInferRequest.FromString(data)
    split = split_field(data, RAW)
    assert split is not None
    rest, raw = split
    assert [bytes(view) for view in raw] == list(expected.raw_input_contents)
    got = pb.ModelInferRequest.FromString(rest)
    del expected.raw_input_contents[:]
    assert got == expected
    assert rest.endswith(field_99)


def test_a_large_request_keeps_its_buffers_as_views_of_the_bytes_received() -> None:
    image = np.arange(3 * 64 * 128, dtype="<f4").tobytes()
    assert len(image) >= SPLIT_BYTES
    request = pb.ModelInferRequest(model_name="m", id="7", raw_input_contents=[image, b"\x01"])
    request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 64, 128])
    request.inputs.add(name="flag", datatype="BOOL", shape=[1, 1])
    data = request.SerializeToString()
    parsed = parse_infer(data)
    assert [bytes(view) for view in parsed.raw] == [image, b"\x01"]
    assert all(isinstance(view, memoryview) and view.obj is data for view in parsed.raw)
    assert parsed.message.id == "7" and [t.name for t in parsed.message.inputs] == ["image", "flag"]
    assert not parsed.message.raw_input_contents


def _large(tail: bytes = b"", head: bytes = b"") -> bytes:
    """A large request (its buffer field first), ``head`` before it and ``tail`` after it."""
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[bytes(SPLIT_BYTES)])
    return head + request.SerializeToString() + tail


@pytest.mark.parametrize(
    "data",
    [
        _large()[:-10],  # cut short inside the buffer
        _large(b"\x0b"),  # a group that never ends
        _large(b"\x0a\x02\xff\xfe"),  # model_name again, not UTF-8
        _large(b"\x00\x01"),  # field number 0
        _large(b"\x18\xff"),  # a truncated varint
        _large(head=b"\xba\x80\x80\x80\x80\x00\x00"),  # a 6-byte tag: protobuf refuses it
    ],
    ids=["truncated", "open group", "utf-8", "field 0", "varint", "long tag"],
)
def test_malformed_large_requests_are_invalid_input(data: bytes) -> None:
    with pytest.raises(pb_message.DecodeError):
        pb.ModelInferRequest.FromString(data)  # protobuf refuses them too
    with pytest.raises(InvalidInputError, match="malformed ModelInferRequest: "):
        parse_infer(data)


def test_what_the_wire_reader_leaves_protobuf_reads_whole() -> None:
    buffer = np.arange(SPLIT_BYTES // 4, dtype="<f4").tobytes()
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[buffer, b"\x01"])
    data = request.SerializeToString()
    # An unknown group (field 99), which the wire reader does not step over.
    group = b"\x9b\x06" + b"\x08\x01" + b"\x9c\x06"
    # More small fields than stepping over them in Python is worth (protobuf is faster).
    many = b"\xa0\x01\x01" * 65  # an unknown field 20 (varint 1), 65 times
    assert split_field(data + many, RAW) is None
    with pytest.raises(WireError):
        split_field(data + group, RAW)
    for extra in (group, many):
        parsed = parse_infer(data + extra)
        assert [bytes(b) for b in parsed.raw] == [buffer, b"\x01"]
        assert parsed.message.model_name == "m"


def test_a_malformed_large_request_over_the_wire_gets_invalid_argument(
    repo_server: ServerThread,
) -> None:
    request = pb.ModelInferRequest(model_name="scale", raw_input_contents=[bytes(SPLIT_BYTES)])
    data = request.SerializeToString()[:-10]  # cut short inside the buffer
    with grpc.insecure_channel(repo_server.target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            infer(data, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ModelInferRequest" in caught.value.details()


def test_a_stream_answer_wraps_the_parts_of_an_infer_response() -> None:
    header = pb.ModelInferResponse(model_name="m", id="1")
    header.outputs.add(name="y", datatype="FP32", shape=[1, 2])
    payload = np.array([[1.5, -2.0]], "<f4")
    raw = payload.reshape(-1).view(np.uint8).data
    parts = [header.SerializeToString(), b"\x32\x08", raw]  # raw_output_contents = 6
    answer = pb.ModelStreamInferResponse.FromString(stream_answer(parts))
    assert not answer.error_message
    assert answer.infer_response.id == "1"
    assert answer.infer_response.raw_output_contents == [payload.tobytes()]
