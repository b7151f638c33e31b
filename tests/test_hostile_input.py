"""Hostile and careless input found by probing both APIs (issue 17): each finding, fixed, with a
test named for it. Every answer is a precise status, and the server goes on serving others."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from support import Busy, Scale, ServerThread, wait_until, write_model
from torchwire.server.plane import inference as plane


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, frontend: str) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("hostile")
    write_model(root / "scale", Scale(2.0), [4])
    write_model(root / "busy", Busy(), [4])
    write_model(root / "ints", Scale(1.0), [4], extra="")
    (root / "ints" / "config.toml").write_text(
        'format = "torchscript"\n[[inputs]]\nname = "x"\ndtype = "INT8"\nshape = [4]\n'
    )
    write_model(root / "var", Scale(2.0), [-1])
    with ServerThread(
        repository=root,
        watch="off",
        model_control="open",
        http_port="auto",
        grpc_frontend=frontend,
    ) as server:
        yield server


@pytest.fixture
def stub(server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str, shape: list[int], raw: bytes | None = None, **contents: Any) -> Any:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype=contents.pop("datatype", "FP32"), shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def _status(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code(), refused.value.details() or ""


def _gauge(server: ServerThread, model: str) -> float:
    value = server.server.metrics.registry.get_sample_value(
        "torchwire_inflight_requests", {"model": model}
    )
    return value or 0.0


def test_finding_2_a_v2_stream_survives_a_request_that_raises_unexpectedly(
    server: ServerThread,
    stub: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = plane.require_model_name

    def require_model_name(name: str) -> None:
        if name == "explode":  # a bug on one request's path
            raise RuntimeError("boom")
        real(name)

    monkeypatch.setattr(plane, "require_model_name", require_model_name)
    ones = np.ones((1, 4), np.float32).tobytes()
    requests = [_request("scale", [1, 4], ones), _request("explode", [1, 4], ones),
                _request("scale", [1, 4], ones)]  # fmt: skip
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert [bool(a.error_message) for a in answers] == [False, True, False]
    assert answers[1].error_message.startswith("[INTERNAL] internal server error (error id ")
    # The bug's own words stay in the log, under the error id the caller was given.
    error_id = re.search(r"error id (\w+)", answers[1].error_message)
    assert error_id and "boom" not in answers[1].error_message
    assert f"error id {error_id.group(1)}" in caplog.text and "boom" in caplog.text
    assert (
        answers[2].infer_response.raw_output_contents[0] == (np.ones(4, np.float32) * 2).tobytes()
    )


def test_finding_3_negative_and_overflowing_dimensions_are_invalid_argument(
    server: ServerThread, stub: Any
) -> None:
    code, details = _status(lambda: stub.ModelInfer(_request("var", [1, -2, -2], b"\0" * 16)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "every dimension >= 1" in details
    code, details = _status(lambda: stub.ModelInfer(_request("var", [2**40, 2**40], b"")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than any request can carry" in details


def test_finding_3_int8_contents_out_of_range_are_invalid_argument(
    server: ServerThread, stub: Any
) -> None:
    request = _request("ints", [1, 4], datatype="INT8", int_contents=[1, 2, 3, 1000])
    code, details = _status(lambda: stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "values out of range for INT8 (-128 to 127)" in details


def test_finding_5_the_seed_api_refuses_floats_that_an_int8_input_cannot_hold(
    server: ServerThread, seed: SimpleNamespace
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)

        def predict(values: list[float]) -> Any:
            request = seed.pb2.PredictRequest(inputs=values, metadata={"model": "ints"})
            return stub.Predict(request, timeout=10)

        for bad, shown in (([1, 2, 3, 1000], "1000.0"), ([1, 2, 3, float("nan")], "nan"),
                           ([1, 2, 3, 0.5], "0.5")):  # fmt: skip
            code, details = _status(lambda bad=bad: predict(bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "every value must be a whole number from -128 to 127" in details
            assert shown in details
        assert list(predict([1, -2, 3, 127]).outputs) == [1, -2, 3, 127]


def test_finding_5_raw_and_typed_contents_together_are_refused(
    server: ServerThread, stub: Any
) -> None:
    request = _request("scale", [1, 4], np.ones(4, np.float32).tobytes(), fp32_contents=[1] * 4)
    code, details = _status(lambda: stub.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "has typed contents while the request carries raw_input_contents" in details


def test_finding_6_cancelled_streams_leave_nothing_in_flight_and_are_counted(
    server: ServerThread, stub: Any, seed: SimpleNamespace
) -> None:
    registry = server.server.metrics.registry

    def cancelled(api: str) -> float:
        labels = {"model": "busy", "version": "1", "api": api, "code": "CANCELLED"}
        return registry.get_sample_value("torchwire_requests_total", labels) or 0.0

    before = {api: cancelled(api) for api in ("v2_stream", "seed_stream")}
    slow = np.array([[300, 0, 0, 0]], np.float32)  # a tenth of a second or so each
    with grpc.insecure_channel(server.target) as channel:
        seed_stub = seed.grpc.ModelServiceStub(channel)
        for _ in range(5):
            # V2: many requests in flight, then the caller goes away.
            v2 = stub.ModelStreamInfer(iter([_request("busy", [1, 4], slow.tobytes())] * 40))
            wait_until(lambda: _gauge(server, "busy") > 0, "nothing reached the model")
            v2.cancel()
            # Seed: more requests than the stream's window, so the reader blocks, then cancel.
            requests = [seed.pb2.PredictRequest(inputs=slow.ravel(), metadata={"model": "busy"})]
            call = seed_stub.PredictStream(iter(requests * 300))  # window: 128
            wait_until(lambda: _gauge(server, "busy") > 0, "nothing reached the model")
            call.cancel()
    wait_until(lambda: _gauge(server, "busy") == 0, "the in-flight gauge never came back to 0")
    assert cancelled("v2_stream") > before["v2_stream"]
    assert cancelled("seed_stream") > before["seed_stream"]


def test_finding_7_a_huge_model_name_gets_not_found_with_a_bounded_message(
    server: ServerThread, stub: Any
) -> None:
    name = "m" * 100_000
    code, details = _status(lambda: stub.ModelInfer(_request(name, [1, 4], b"\0" * 16)))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "(100000 characters) not found" in details and len(details) < 400


def test_finding_7_load_parameters_are_refused_not_ignored(server: ServerThread) -> None:
    client = triton.InferenceServerClient(server.target)
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("scale", config='{"max_batch_size": 1}')
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "load parameters ['config'] are not supported" in refused.value.message()
    client.load_model("scale")  # without parameters: fine
    client.close()


def test_finding_7_a_tls_key_that_does_not_match_its_certificate_says_so(
    tmp_path: Path,
) -> None:
    import subprocess

    from support import TORCHWIRE

    def pem(name: str) -> tuple[Path, Path]:
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        return key, cert

    key_a, _ = pem("a")
    _, cert_b = pem("b")
    result = subprocess.run(
        [TORCHWIRE, "serve", "--port", "0", "--http-port", "0", "--metrics-port", "0",
         "--tls-cert", str(cert_b), "--tls-key", str(key_a)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"--tls-key {key_a} does not go with --tls-cert {cert_b}" in result.stderr


def test_no_status_is_sent_after_the_deadline_ended_the_call() -> None:
    """Past its deadline gRPC has ended the call (the caller has DEADLINE_EXCEEDED); sending a
    status then fails and gRPC logs an ExecuteBatchError traceback (seen in benchmarks/soak.py
    once per few hundred missed deadlines). The handler stops quietly instead."""
    import asyncio

    from torchwire.errors import DeadlineExceededError
    from torchwire.server.common.status import abort_with

    class PastDeadline:  # the two methods of grpc.aio.ServicerContext that abort_with uses
        aborted = False

        def time_remaining(self) -> float:
            return -0.001

        async def abort(self, *args: Any) -> None:
            self.aborted = True

    context = PastDeadline()
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort_with(context, DeadlineExceededError("deadline passed")))  # type: ignore[arg-type]
    assert not context.aborted


def test_finding_7_load_errors_name_files_relative_to_the_repository(
    server: ServerThread,
) -> None:
    root = Path(server.server.settings.repository)  # type: ignore[arg-type]
    broken = root / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.toml").write_text(
        'format = "torchscript"\n[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [4]\n'
    )
    (broken / "1" / "model.pt").write_bytes(b"not a model")
    client = triton.InferenceServerClient(server.target)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("broken")
        message = refused.value.message()
        assert "broken/1/model.pt: cannot load torchscript model" in message
        assert str(root) not in message and "\n" not in message
    finally:
        client.close()


def test_finding_7_a_variable_shape_model_reports_variable_output_dimensions(
    server: ServerThread,
) -> None:
    client = triton.InferenceServerClient(server.target)
    meta = client.get_model_metadata("var")  # y = 2 x, x of any length
    client.close()
    assert list(meta.inputs[0].shape) == [-1, -1]
    assert list(meta.outputs[0].shape) == [-1, -1]  # was [-1, 1]: the warm-up's size


def test_finding_3_an_unreadable_repository_is_a_precise_error_not_internal(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(server.server.settings.repository)  # type: ignore[arg-type]
    real = Path.iterdir

    def iterdir(self: Path) -> Any:  # root reads anything: permissions cannot be tried here
        if self == root:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    client = triton.InferenceServerClient(server.target)
    try:
        index = client.get_model_repository_index()
        assert any("cannot read the repository" in m.reason for m in index.models)
        with pytest.raises(InferenceServerException) as refused:
            client.load_model("scale")
        assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "cannot read the repository: [Errno 13] Permission denied" in (
            refused.value.message()
        )
    finally:
        client.close()


def test_finding_7_cr_lf_in_a_request_id_cannot_forge_access_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gRPC and aiohttp refuse CR/LF in headers, but other stacks in front may pass them on:
    the access log keeps only printable characters of a client's id, 128 at most."""
    from torchwire.metrics import Metrics
    from torchwire.server.common.observe import Observer

    observer = Observer(Metrics(process_metrics=False), access_log=True)
    forged = "abc\r\n2026-11-27 INFO torchwire.access: peer=evil code=OK"
    with caplog.at_level("INFO", logger="torchwire.access"):
        observer.http_call("v2_http", "10.0.0.1", {"x-request-id": forged}).finish()
    (record,) = [r for r in caplog.records if r.name == "torchwire.access"]
    assert "\n" not in record.getMessage() and "\r" not in record.getMessage()
    assert record.request_id == forged.replace("\r", "").replace("\n", "")  # type: ignore[attr-defined]
