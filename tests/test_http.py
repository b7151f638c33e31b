"""The KServe V2 REST API: Triton's own ``tritonclient.http`` unchanged, plain JSON as curl would
send it, and every client mistake answered with a 4xx status and a JSON error."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from torch import nn
from tritonclient.utils import InferenceServerException

from support import (
    TORCHWIRE,
    Busy,
    CliServer,
    ServerThread,
    http_request,
    in_process,
    wait_until,
    write_model,
)


class PixelMean(nn.Module):
    """UINT8 images in, each channel's mean out (a vision model normalises on its device)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The demo models, a busy one (queue of 1 item, 2 MB body limit) and one of UINT8 pixels,
    HTTP on a free port."""
    root = tmp_path_factory.mktemp("http-repo")
    for name in ("recsys", "resnet18"):
        (root / name).symlink_to(demo_repo / name)
    write_model(root / "busy", Busy(), [4], extra="[batching]\nmax_queue = 1\n")
    write_model(root / "pixels", PixelMean(), [3, 8, 8], dtype="UINT8")
    with ServerThread(
        repository=root,
        http_port="auto",
        max_message_bytes=2 * 2**20,
        watch="off",
        model_control="open",
    ) as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> Iterator[Any]:
    http = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    yield http
    http.close()


def _post(server: ServerThread, path: str, body: bytes | None = None, method: str = "POST") -> Any:
    """(status, parsed JSON body) of a plain HTTP request, as curl would send it."""
    status, _, answer = http_request(server.server.http_port, method, path, body)
    return status, answer


def _recsys(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)


def test_tritonclient_http_works_unchanged(
    server: ServerThread, client: Any, demo_repo: Path
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("recsys") and not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.get_model_metadata("recsys") == {
        "name": "recsys",
        "versions": ["1"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 256]}],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
    }
    config = client.get_model_config("resnet18")
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [3, 224, 224]}]
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} >= {("recsys", "READY"), ("busy", "READY")}
    x = _recsys(5)
    expected = in_process(demo_repo / "recsys" / "1" / "model.pt")(x)
    answers = {}
    for binary in (True, False):
        tensor = triton_http.InferInput("features", [5, 256], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = triton_http.InferRequestedOutput("score", binary_data=binary)
        result = client.infer("recsys", [tensor], outputs=[wanted], request_id="r-1")
        assert result.get_response()["id"] == "r-1"
        answers[binary] = result.as_numpy("score")
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    tensor = triton_grpc.InferInput("features", [5, 256], "FP32")
    tensor.set_data_from_numpy(x)
    over_grpc = grpc_client.infer("recsys", [tensor]).as_numpy("score")
    grpc_client.close()
    # The same numbers over gRPC, HTTP binary and HTTP JSON (JSON floats round-trip exactly).
    np.testing.assert_array_equal(answers[True], over_grpc)
    np.testing.assert_array_equal(answers[False], over_grpc)
    np.testing.assert_allclose(over_grpc, expected, rtol=1e-6)
    stats = client.get_inference_statistics("recsys")["model_stats"][0]
    assert stats["name"] == "recsys" and stats["inference_count"] >= 15
    registry = server.server.metrics.registry
    labels = {"model": "recsys", "version": "1", "api": "v2_http", "code": "OK"}
    assert registry.get_sample_value("torchwire_requests_total", labels) >= 2


def test_plain_json_as_curl_sends_it(server: ServerThread) -> None:
    rows = _recsys(2).tolist()  # nested lists, as a person writes them
    body = {"id": "q", "inputs": [{"name": "features", "shape": [2, 256], "datatype": "FP32",
                                   "data": rows}]}  # fmt: skip
    status, answer = _post(server, "/v2/models/recsys/versions/1/infer", json.dumps(body).encode())
    assert status == 200
    assert answer["model_name"] == "recsys" and answer["model_version"] == "1"
    assert answer["id"] == "q"
    (output,) = answer["outputs"]
    assert output["name"] == "score" and output["datatype"] == "FP32" and output["shape"] == [2, 1]
    assert len(output["data"]) == 2 and all(0 < v < 1 for v in output["data"])


def test_load_and_unload_over_http(server: ServerThread, client: Any) -> None:
    client.unload_model("resnet18")
    assert not client.is_model_ready("resnet18")
    status, answer = _post(server, "/v2/models/resnet18")
    assert status == 405 and "use" in answer["error"]  # metadata is GET: the route exists
    with pytest.raises(InferenceServerException) as gone:
        client.get_model_metadata("resnet18")
    assert gone.value.status() == "404"
    client.load_model("resnet18")
    assert client.is_model_ready("resnet18")
    status, answer = _post(server, "/v2/repository/models/..%2Fetc/load", b"")
    assert (status, answer) == (
        400,
        {"error": "invalid model name '../etc': no '/', '\\\\', '..' or NUL, and not empty"},
    )


def _body(**changes: Any) -> bytes:
    tensor = {"name": "features", "shape": [1, 256], "datatype": "FP32", "data": [0.0] * 256}
    tensor.update(changes)
    return json.dumps({"inputs": [tensor]}).encode()


INFER = "/v2/models/recsys/infer"
NO_DATA = {"inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32"}]}
UNKNOWN_OUTPUT = {**json.loads(_body()), "outputs": [{"name": "y"}]}
BAD_TIMEOUT = {**json.loads(_body()), "parameters": {"timeout": -1}}
DEEP_SHAPE = (  # 1,000 lists deep: orjson reads it, repr() of it would recurse past its limit
    b'{"inputs": [{"name": "features", "datatype": "FP32", "data": [0], "shape": '
    + b"[" * 1000 + b"]" * 1000 + b"}]}"
)  # fmt: skip
MISTAKES: dict[str, tuple[str, bytes | None, int, str]] = {
    "not JSON": (INFER, b"{bad", 400, "not valid JSON"),
    "not an object": (INFER, b"[1, 2]", 400, "must be a JSON object"),
    "no inputs": (INFER, b"{}", 400, "needs 'inputs'"),
    "unknown model": ("/v2/models/nope/infer", _body(), 404, "model 'nope' not found"),
    "unknown version": (
        "/v2/models/recsys/versions/7/infer", _body(), 404,
        "version '7' of model 'recsys' not found",
    ),
    "wrong shape": (INFER, _body(shape=[1, 3]), 400, "expected shape [N, 256]"),
    "wrong datatype": (INFER, _body(datatype="INT32"), 400, "expected datatype FP32"),
    "unknown datatype": (INFER, _body(datatype="FP8"), 400, "not supported"),
    "too few values": (INFER, _body(data=[1.0] * 3), 400, "data holds 3 values"),
    "strings": (INFER, _body(data=["a"] * 256), 400, "not numbers"),
    "ragged": (INFER, _body(data=[[1.0], [1.0, 2.0]]), 400, "ragged"),
    "shape not ints": (INFER, _body(shape=[1, "256"]), 400, "list of integers"),
    "no data": (INFER, json.dumps(NO_DATA).encode(), 400, "neither 'data'"),
    "unknown input": (INFER, _body(name="x"), 400, "unknown: ['x']"),
    "unknown output": (INFER, json.dumps(UNKNOWN_OUTPUT).encode(), 400, "unknown outputs ['y']"),
    "bad timeout": (INFER, json.dumps(BAD_TIMEOUT).encode(), 400, "microseconds"),
    "nested too deep": (INFER, b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "too deeply"),
    "too many digits": (INFER, b'{"a": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
    "deep shape": (INFER, DEEP_SHAPE, 400, "'shape' must be a list of integers, got [[[[[[["),
    "no endpoint": ("/v2/nothing", None, 404, "no such endpoint: GET /v2/nothing"),
    "too large": (INFER, b" " * (3 * 2**20), 413, "too large"),
}  # fmt: skip


def test_json_numbers_only_python_reads_are_read_as_before(server: ServerThread) -> None:
    # Python's json writes NaN and Infinity (and reads 1e400 as infinity); strict parsers refuse
    # them. torchwire reads them as the json module does.
    values = ["NaN", "Infinity", "-Infinity", "1e400"] + ["0.5"] * 252
    body = (
        '{"inputs": [{"name": "features", "shape": [1, 256], "datatype": "FP32", "data": ['
        + ", ".join(values)
        + "]}]}"
    )
    status, answer = _post(server, "/v2/models/recsys/infer", body.encode())
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["shape"] == [1, 1] and np.isnan(output["data"][0])


@pytest.mark.parametrize("mistake", MISTAKES)
def test_client_mistakes_get_a_4xx_and_a_json_error_saying_what_was_wrong(
    server: ServerThread, mistake: str
) -> None:
    path, body, status, says = MISTAKES[mistake]
    got, answer = _post(server, path, body, "POST" if body is not None else "GET")
    assert got == status, answer
    assert says in answer["error"]


def test_binary_data_that_does_not_add_up_is_refused(server: ServerThread) -> None:
    tensor = {"name": "features", "shape": [1, 256], "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": 1024}
    header = json.dumps({"inputs": [tensor]}).encode()
    url = f"http://127.0.0.1:{server.server.http_port}/v2/models/recsys/infer"

    def send(blob: bytes, length: str) -> tuple[int, str]:
        request = urllib.request.Request(url, data=header + blob, method="POST")
        request.add_header("Inference-Header-Content-Length", length)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, ""
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())["error"]

    assert send(bytes(1024), str(len(header)))[0] == 200
    assert send(bytes(1000), str(len(header))) == (
        400,
        "input 'features': binary_data_size 1024 does not fit the 1000 bytes of binary data left",
    )
    status, error = send(bytes(1030), str(len(header)))
    assert status == 400 and "6 bytes of binary data follow the JSON header" in error
    status, error = send(bytes(1024), "999999")
    assert status == 400 and "Inference-Header-Content-Length" in error


def test_queue_full_is_429_and_a_passed_timeout_is_504(server: ServerThread) -> None:
    busy = server.server.repository.get("busy")  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{server.server.http_port}/v2/models/busy/infer"
    from concurrent.futures import ThreadPoolExecutor

    def infer(rounds: float, parameters: dict[str, Any] | None = None) -> tuple[int, Any]:
        tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [rounds, 1, 0, 0]}
        body = {"inputs": [tensor], "parameters": parameters or {}}
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, {**json.loads(error.read()), **dict(error.headers)}

    with ThreadPoolExecutor(2) as pool:
        occupying = pool.submit(infer, 3000)  # about a second of model time
        wait_until(lambda: busy.computing == 1, "the busy request computes")
        expiring = pool.submit(infer, 0, {"timeout": 1000})  # 1 ms: expires while queued
        wait_until(lambda: busy.queued_items == 1, "one item queued")
        status, answer = infer(0)  # the queue (1 item) is full
        assert status == 429 and "queue full (1 of 1 items waiting" in answer["error"]
        assert int(answer["Retry-After"]) >= 1  # seconds: the queue's drain estimate
        assert occupying.result()[0] == 200
        status, answer = expiring.result()
        assert status == 504 and "deadline passed" in answer["error"]


def test_workers_share_the_http_port(tmp_path: Path) -> None:
    server = CliServer("--workers", "2", "--port", "0", "--http-port", "auto",
                       env={"TORCHWIRE_HTTP_PORT": "auto"})  # fmt: skip
    try:
        server.wait_ready()
        found = re.search(r"127\.0\.0\.1:(\d+) \(HTTP\) with 2 workers", server.output)
        assert found, server.output
        port = int(found.group(1))
        client = triton_http.InferenceServerClient(f"127.0.0.1:{port}", concurrency=8)
        tensor = triton_http.InferInput("features", [1, 256], "FP32")
        tensor.set_data_from_numpy(_recsys(1))
        pending = [client.async_infer("recsys", [tensor]) for _ in range(64)]
        assert all(p.get_result().as_numpy("score").shape == (1, 1) for p in pending)
        client.close()
    finally:
        server.close()


def test_ready_is_503_while_the_server_cannot_serve(server: ServerThread) -> None:
    assert _post(server, "/v2/health/ready", None, "GET") == (200, {})
    server.run(server.server.health.memory(False))  # what the memory watchdog does
    try:
        status, answer = _post(server, "/v2/health/ready", None, "GET")
        assert status == 503 and "not ready" in answer["error"]
        assert _post(server, "/v2/health/live", None, "GET") == (200, {})
    finally:
        server.run(server.server.health.memory(True))


@pytest.mark.parametrize("protocol", ["seed", "v2"])
def test_bench_sends_a_uint8_model_whole_numbers_over_grpc(
    server: ServerThread, tmp_path: Path, protocol: str
) -> None:
    # The seed API carries floats: a UINT8 model takes only whole numbers in its range.
    out = tmp_path / "run.json"
    result = subprocess.run(
        [TORCHWIRE, "bench", "--target", server.target, "--model", "pixels", "--protocol",
         protocol, "--concurrency", "2", "--duration", "1", "--warmup", "0.2", "--quiet",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["errors"] == 0 and summary["ok"] == summary["requests"] > 20


@pytest.mark.parametrize("protocol", ["http", "http_json"])
def test_bench_loads_the_http_api(server: ServerThread, tmp_path: Path, protocol: str) -> None:
    out = tmp_path / "run.json"
    target = f"127.0.0.1:{server.server.http_port}"
    # recsys (FP32) both ways; pixels (UINT8 images, as a vision client sends them) in its dtype.
    for model, mode in (
        ("recsys", ["--concurrency", "4"]), ("recsys", ["--rate", "200"]),
        ("pixels", ["--concurrency", "4"]),
    ):  # fmt: skip
        result = subprocess.run(
            [TORCHWIRE, "bench", "--target", target, "--model", model, "--protocol", protocol,
             "--duration", "1", "--warmup", "0.2", "--quiet", "--json", str(out), *mode],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = json.loads(out.read_text())["summary"]
        assert summary["errors"] == 0 and summary["ok"] == summary["requests"] > 50
    refused = subprocess.run(
        [TORCHWIRE, "bench", "--target", target, "--model", "recsys", "--protocol", protocol,
         "--stream"], capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "--stream needs a gRPC protocol" in refused.stderr
