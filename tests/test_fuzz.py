"""Fuzzing both APIs against a real server: random and mutated messages, shapes, dtypes, names,
versions and metadata. Every answer is a precise status (never UNKNOWN, never INTERNAL for a
client's mistake; over HTTP never a 5xx), and an ordinary client is served all along.

Seconds in CI; ``TORCHWIRE_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/test_fuzz.py`` for a long run
(``benchmarks/fuzz.sh``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from support import Scale, ServerThread, write_model
from torchwire._proto.modelservice_messages_pb2 import PredictRequest

EXAMPLES = int(os.environ.get("TORCHWIRE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=EXAMPLES <= 120,  # CI: the same examples every run (no flakes); long runs roam
)
CLIENT_MISTAKES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
V2 = "/inference.GRPCInferenceService/"
DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    write_model(root / "scale", Scale(2.0), [4])
    write_model(root / "var", Scale(3.0), [-1])
    write_model(root / "ints", Scale(1.0), [4])
    (root / "ints" / "config.toml").write_text(
        'format = "torchscript"\n[[inputs]]\nname = "x"\ndtype = "INT8"\nshape = [4]\n'
    )
    with ServerThread(repository=root, watch="off", http_port="auto") as server:
        yield server


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def _code(call: Any, data: bytes, metadata: Any = None) -> grpc.StatusCode:
    try:
        call(data, timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _still_served(channel: grpc.Channel) -> None:
    request = pb.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype="<f4").tobytes())
    answer = pb.ModelInferResponse.FromString(
        channel.unary_unary(V2 + "ModelInfer")(request.SerializeToString(), timeout=10)
    )
    assert np.frombuffer(answer.raw_output_contents[0], "<f4").tolist() == [0, 2, 4, 6]


names = st.sampled_from(["scale", "var", "ints", "", "nope", "../x", "x" * 300]) | st.text(
    max_size=20
)
versions = st.sampled_from(
    ["", "1", "2", "-1", "01", "\u00b2", "\u0661", "99999999999999999999"]
) | st.text(max_size=8)
shapes = st.lists(
    st.sampled_from([-(2**63), -2, -1, 0, 1, 2, 3, 4, 5, 2**31, 2**62]) | st.integers(-3, 9),
    max_size=4,
)


@st.composite
def v2_requests(draw: st.DrawFn) -> bytes:
    request = pb.ModelInferRequest(model_name=draw(names), model_version=draw(versions))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["x", "y", ""])),
            datatype=draw(st.sampled_from([*DATATYPES, "BYTES", "fp32", ""])),
            shape=draw(shapes),
        )
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            field = draw(st.sampled_from(["fp32_contents", "int_contents", "bool_contents"]))
            values = {
                "fp32_contents": st.floats(width=32, allow_nan=True),
                "int_contents": st.integers(-(2**31), 2**31 - 1),
                "bool_contents": st.booleans(),
            }[field]
            getattr(tensor.contents, field).extend(draw(st.lists(values, max_size=12)))
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(st.sampled_from(["output", "y", ""])))
    return request.SerializeToString()


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Flip, insert or delete bytes of a valid message."""
    out = bytearray(data)
    for kind, where, value in edits:
        if not out:
            out.append(value)
            continue
        at = where % len(out)
        if kind == 0:
            out[at] ^= value or 1
        elif kind == 1:
            out.insert(at, value)
        else:
            del out[at]
    return bytes(out)


edits = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), max_size=6
)


@FUZZ
@given(data=v2_requests())
def test_v2_infer_with_random_requests(channel: grpc.Channel, data: bytes) -> None:
    assert _code(channel.unary_unary(V2 + "ModelInfer"), data) in CLIENT_MISTAKES


@FUZZ
@given(data=v2_requests(), changes=edits)
def test_v2_infer_with_mutated_messages(channel: grpc.Channel, data: bytes, changes: Any) -> None:
    assert _code(channel.unary_unary(V2 + "ModelInfer"), _mutate(data, changes)) in CLIENT_MISTAKES


@FUZZ
@given(
    method=st.sampled_from(
        ["ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics", "RepositoryIndex",
         "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
         "TraceSetting", "ServerMetadata"]
    ),
    data=st.binary(max_size=80),
)  # fmt: skip
def test_every_v2_method_with_random_bytes(channel: grpc.Channel, method: str, data: bytes) -> None:
    code = _code(channel.unary_unary(V2 + method), data)
    assert code in CLIENT_MISTAKES | {grpc.StatusCode.PERMISSION_DENIED}, (method, code)


@FUZZ
@given(data=v2_requests(), changes=edits, count=st.integers(1, 4))
def test_v2_streams_with_mutated_messages(
    channel: grpc.Channel, data: bytes, changes: Any, count: int
) -> None:
    stream = channel.stream_stream(V2 + "ModelStreamInfer")
    try:
        for answer in stream(iter([_mutate(data, changes)] * count), timeout=10):
            message = pb.ModelStreamInferResponse.FromString(answer).error_message
            assert not message.startswith(("[INTERNAL]", "[UNKNOWN]")), message
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_MISTAKES, exc


@FUZZ
@given(
    model=names,
    version=versions,
    floats=st.lists(st.floats(width=32), max_size=12),
    raw=st.none() | st.binary(max_size=40),
    changes=edits,
)
def test_seed_predict_with_random_and_mutated_requests(
    channel: grpc.Channel, model: str, version: str, floats: list[float],
    raw: bytes | None, changes: Any,
) -> None:  # fmt: skip
    request = PredictRequest(inputs=floats, metadata={"model": model, "version": version})
    if raw is not None:
        request.raw_inputs = raw
    predict = channel.unary_unary("/ModelService/Predict")
    for data in (request.SerializeToString(), _mutate(request.SerializeToString(), changes)):
        assert _code(predict, data) in CLIENT_MISTAKES


@FUZZ
@given(
    metadata=st.lists(
        st.tuples(
            st.sampled_from(["x-request-id", "model", "authorization", "grpc-timeout-x"]),
            st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
        ),
        max_size=4,
    )
)
def test_any_printable_metadata(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> None:
    request = pb.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(bytes(16))
    code = _code(channel.unary_unary(V2 + "ModelInfer"), request.SerializeToString(), metadata)
    assert code == grpc.StatusCode.OK


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def http_bodies(draw: st.DrawFn) -> bytes:
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["x", "y"]) | json_values),
        "datatype": draw(st.sampled_from(DATATYPES) | json_values),
        "shape": draw(shapes | json_values),
        "data": draw(
            st.lists(st.floats() | st.integers() | st.booleans(), max_size=10) | json_values
        ),
    }
    if draw(st.booleans()):
        tensor.pop(draw(st.sampled_from(list(tensor))))
    body = {"inputs": [tensor]} if draw(st.booleans()) else draw(json_values)
    text = json.dumps(body).encode()
    return _mutate(text, draw(edits)) if draw(st.booleans()) else text


@FUZZ
@given(
    model=st.sampled_from(["scale", "var", "ints", "nope", "%2e%2e", "x" * 300]),
    body=http_bodies(),
    header=st.none() | st.sampled_from(["0", "5", "-1", "abc", "99999999"]),
)
def test_http_infer_with_random_bodies(
    server: ServerThread, model: str, body: bytes, header: str | None
) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server.http_port}/v2/models/{model}/infer", data=body,
        method="POST",
    )  # fmt: skip
    if header is not None:
        request.add_header("Inference-Header-Content-Length", header)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
        assert "error" in json.loads(error.read())
    assert status < 500, status


def test_after_all_that_an_ordinary_client_is_served(
    server: ServerThread, channel: grpc.Channel
) -> None:
    _still_served(channel)
    registry = server.server.metrics.registry
    for code in ("INTERNAL", "UNKNOWN"):
        for api in ("v2", "seed", "v2_stream", "v2_http"):
            for model in ("scale", "var", "ints", ""):
                labels = {"model": model, "version": "1" if model else "", "api": api, "code": code}
                assert not registry.get_sample_value("torchwire_requests_total", labels), labels
