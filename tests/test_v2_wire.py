"""A large V2 request's tensor buffers are lifted out at the wire level, and its answer's written
there: both must agree with protobuf, whatever order the fields come in."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from support import ServerThread
from torchwire.errors import InvalidInputError
from torchwire.server.v2_codec import SPLIT_BYTES, parse_infer, stream_answer
from torchwire.server.wire import split_field

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
    rest, raw = split_field(data, RAW)
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


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x3a\xff\xff\x04" + b"\0" * SPLIT_BYTES, "runs past the end"),  # raw, 80 KiB claimed
        (b"\x3a\x80\x80\x04" + b"\0" * SPLIT_BYTES + b"\x0b", "unsupported wire type 3"),
        (b"\x3a\x80\x80\x04" + b"\0" * SPLIT_BYTES + b"\x0a\x02\xff\xfe", "UTF-8|Error parsing"),
        (b"\x3a\x80\x80\x04" + b"\0" * SPLIT_BYTES + b"\x00\x01", "field number 0"),
        (b"\x3a\x80\x80\x04" + b"\0" * SPLIT_BYTES + b"\x18\xff", "truncated varint"),
    ],
)
def test_malformed_large_requests_are_invalid_input(data: bytes, why: str) -> None:
    assert len(data) >= SPLIT_BYTES
    with pytest.raises(InvalidInputError, match=f"malformed ModelInferRequest: .*({why})"):
        parse_infer(data)


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
