"""Triton's own client, unchanged, against torchwire's KServe V2 API."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from torch import nn
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from support import Busy, Scale, ServerThread, in_process, wait_until, write_model
from torchwire.repository import ensure_demo_repository
from torchwire.runtime.cost import DEFAULT_TORCH_THREADS

TORCHWIRE = str(Path(sys.executable).parent / "torchwire")
DTYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "BF16": ml_dtypes.bfloat16,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


BIG = 20_000


class Pair(nn.Module):
    """Two inputs, two named outputs."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": a + b, "prod": a * b}


class Difference(nn.Module):
    """Two inputs whose order matters, two named outputs."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"difference": a - b, "prod": a * b}


class Same(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


PAIR_CONFIG = """format = "torchscript"
[[inputs]]
name = "a"
shape = [3]
[[inputs]]
name = "b"
shape = [3]
[[outputs]]
name = "sum"
shape = [3]
[[outputs]]
name = "prod"
shape = [3]
"""


@pytest.fixture(scope="module")
def v2_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("v2repo")
    (root / "pair" / "1").mkdir(parents=True)
    (root / "pair" / "config.toml").write_text(PAIR_CONFIG)
    torch.jit.script(Pair()).save(str(root / "pair" / "1" / "model.pt"))
    # The same with 80 KB per input and item: requests large enough to be read without
    # protobuf's copies (v2_codec.SPLIT_BYTES).
    (root / "pair_big" / "1").mkdir(parents=True)
    big_config = PAIR_CONFIG.replace("[3]", f"[{BIG}]").replace('"sum"', '"difference"')
    (root / "pair_big" / "config.toml").write_text(big_config)
    torch.jit.script(Difference()).save(str(root / "pair_big" / "1" / "model.pt"))
    for dtype in DTYPES:
        write_model(root / f"same_{dtype.lower()}", Same(), [2])
        config = root / f"same_{dtype.lower()}" / "config.toml"
        config.write_text(config.read_text().replace('"FP32"', f'"{dtype}"'))
    write_model(root / "scale", Scale(2.0), [4])
    return root


@pytest.fixture(scope="module")
def v2_server(v2_repo: Path) -> Iterator[ServerThread]:
    with ServerThread(
        repository=v2_repo, default_model="scale", watch="off", model_control="open"
    ) as server:
        yield server


@pytest.fixture
def client(v2_server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=v2_server.target)
    yield client
    client.close()


def _input(name: str, array: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_server_and_model_state(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("pair") and client.is_model_ready("scale", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("scale", "9")
    metadata = client.get_model_metadata("pair")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("a", "FP32", [-1, 3]),
        ("b", "FP32", [-1, 3]),
    ]
    assert [t.name for t in metadata.outputs] == ["sum", "prod"]
    assert metadata.versions == ["1"] and metadata.platform == "pytorch_libtorch"
    config = client.get_model_config("scale").config
    assert config.name == "scale" and config.max_batch_size == 64
    assert list(config.input[0].dims) == [4] and config.input[0].name == "x"
    server = client.get_server_metadata()
    assert server.name == "torchwire" and "model_repository" in server.extensions


def test_infer_and_async_infer_on_both_demo_models(
    demo_server: ServerThread, demo_repo: Path
) -> None:
    rng = np.random.default_rng(40)
    features = rng.standard_normal((3, 256), dtype=np.float32)
    images = rng.standard_normal((2, 3, 224, 224), dtype=np.float32)
    client = triton.InferenceServerClient(url=demo_server.target)
    try:
        scores = client.infer("recsys", [_input("features", features)]).as_numpy("score")
        done: queue.Queue[Any] = queue.Queue()
        client.async_infer(
            "resnet18",
            [_input("image", images)],
            callback=lambda result, error: done.put((result, error)),
            outputs=[triton.InferRequestedOutput("logits")],
        )
        result, error = done.get(timeout=60)
        assert error is None
        logits = result.as_numpy("logits")
    finally:
        client.close()
    np.testing.assert_allclose(
        scores, in_process(demo_repo / "recsys/1/model.pt")(features), 1e-5, 1e-6
    )
    np.testing.assert_allclose(
        logits, in_process(demo_repo / "resnet18/1/model.pt")(images), 1e-4, 1e-5
    )


def test_typed_contents_are_accepted_and_answers_match_the_seed_api(
    demo_server: ServerThread, seed: Any
) -> None:
    """Non-binary tensors (typed ``contents``), and the same answers as through the seed API."""
    features = np.random.default_rng(41).standard_normal((2, 256), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="recsys", id="typed")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[2, 256])
    tensor.contents.fp32_contents.extend(features.ravel().tolist())
    with grpc.insecure_channel(demo_server.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=30
        )
        seed_answer = seed.grpc.ModelServiceStub(channel).Predict(
            seed.pb2.PredictRequest(inputs=features.ravel(), metadata={"model": "recsys"}),
            timeout=30,
        )
    assert response.id == "typed" and response.model_version == "1"
    v2 = np.frombuffer(response.raw_output_contents[0], "<f4")
    np.testing.assert_array_equal(v2, np.array(seed_answer.outputs, np.float32))


def test_two_inputs_two_outputs_and_output_subset(client: triton.InferenceServerClient) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 2.0, np.float32)
    result = client.infer("pair", [_input("a", a), _input("b", b)])
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("prod"), a * b)
    only = client.infer(
        "pair", [_input("b", b), _input("a", a)], outputs=[triton.InferRequestedOutput("prod")]
    )
    assert only.as_numpy("sum") is None
    np.testing.assert_array_equal(only.as_numpy("prod"), a * b)


def test_large_tensors_in_any_input_order_unary_and_streamed(
    client: triton.InferenceServerClient,
) -> None:
    rng = np.random.default_rng(3)
    pairs = [rng.standard_normal((2, n + 1, BIG), dtype=np.float32) for n in range(4)]
    a, b = pairs[0]
    only = client.infer(
        "pair_big",
        [_input("b", b), _input("a", a)],
        outputs=[triton.InferRequestedOutput("difference")],
    )
    assert only.as_numpy("prod") is None
    np.testing.assert_array_equal(only.as_numpy("difference"), a - b)
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, (a, b) in enumerate(pairs):
            client.async_stream_infer(
                "pair_big", [_input("a", a), _input("b", b)], request_id=f"{i}"
            )
        received = [answers.get(timeout=30) for _ in pairs]
    finally:
        client.stop_stream()
    assert [error for _, error in received] == [None] * len(pairs)
    for result, _ in received:
        a, b = pairs[int(result.get_response().id)]
        np.testing.assert_array_equal(result.as_numpy("difference"), a - b)
        np.testing.assert_array_equal(result.as_numpy("prod"), a * b)


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_round_trips(client: triton.InferenceServerClient, datatype: str) -> None:
    values = np.array([[1, 0], [3, 1]]).astype(DTYPES[datatype])
    result = client.infer(f"same_{datatype.lower()}", [_input("x", values, datatype)])
    answer = result.as_numpy("output")
    assert answer.dtype == values.dtype
    np.testing.assert_array_equal(answer, values)


def test_stream_of_100_requests_all_answered_by_id(client: triton.InferenceServerClient) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(100):
            x = np.full((1, 4), i, np.float32)
            client.async_stream_infer("scale", [_input("x", x)], request_id=str(i))
        # A bad request in the middle gets an error in the stream, and the stream goes on.
        client.async_stream_infer(
            "scale", [_input("x", np.ones((1, 3), np.float32))], request_id="bad"
        )
        client.async_stream_infer(
            "scale", [_input("x", np.ones((1, 4), np.float32))], request_id="after"
        )
        received = [answers.get(timeout=30) for _ in range(102)]
    finally:
        client.stop_stream()
    good = {r.get_response().id: r.as_numpy("output") for r, e in received if e is None}
    errors = [e for r, e in received if e is not None]
    assert len(good) == 101 and len(errors) == 1
    for i in range(100):
        np.testing.assert_array_equal(good[str(i)], np.full((1, 4), 2.0 * i, np.float32))
    assert "input 'x': expected shape [N, 4]" in str(errors[0])


def test_errors_name_what_was_wrong(
    client: triton.InferenceServerClient, v2_server: ServerThread
) -> None:
    def fails(*args: Any, **kwargs: Any) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(*args, **kwargs)
        return caught.value

    missing = fails("nope", [_input("x", np.ones((1, 4), np.float32))])
    assert missing.status() == "StatusCode.NOT_FOUND" and "'nope' not found" in missing.message()
    shape = fails("scale", [_input("x", np.ones((2, 5), np.float32))])
    assert shape.status() == "StatusCode.INVALID_ARGUMENT"
    assert (
        "input 'x': expected shape [N, 4] (N >= 1, every dimension >= 1), got [2, 5]"
        in shape.message()
    )
    dtype = fails("scale", [_input("x", np.ones((1, 4), np.float64), "FP64")])
    assert "input 'x': expected datatype FP32, got FP64" in dtype.message()
    version = fails("scale", [_input("x", np.ones((1, 4), np.float32))], model_version="7")
    assert version.status() == "StatusCode.NOT_FOUND"

    with grpc.insecure_channel(v2_server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="scale")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * 15)
        with pytest.raises(grpc.RpcError) as raw:
            stub.ModelInfer(request, timeout=10)
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw content holds 15 bytes; shape [1, 4] of FP32 needs 16" in raw.value.details()
        request.inputs[0].datatype = "UINT64"
        with pytest.raises(grpc.RpcError) as unsupported:
            stub.ModelInfer(request, timeout=10)
        assert (
            "'UINT64' is not supported; supported: FP32, FP64, FP16, BF16"
            in unsupported.value.details()
        )
        request.inputs[0].datatype = "BYTES"  # a datatype, but not this model's
        with pytest.raises(grpc.RpcError) as other:
            stub.ModelInfer(request, timeout=10)
        assert "input 'x': expected datatype FP32, got BYTES" in other.value.details()


def test_repository_index_load_unload_and_statistics(
    client: triton.InferenceServerClient, v2_repo: Path
) -> None:
    names = {m.name for m in client.get_model_repository_index().models}
    assert {"pair", "scale", "same_fp16"} <= names
    before = client.get_inference_statistics("scale").model_stats[0]
    for _ in range(3):
        client.infer("scale", [_input("x", np.ones((2, 4), np.float32))])
    after = client.get_inference_statistics("scale").model_stats[0]
    assert after.inference_count - before.inference_count == 6
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns

    client.unload_model("pair")
    assert not client.is_model_ready("pair")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["pair"].state == "UNAVAILABLE" and index["pair"].reason == "unloaded"
    client.load_model("pair")
    assert client.is_model_ready("pair")
    for bad in ("../scale", "a/b", "x\0y"):
        with pytest.raises(InferenceServerException) as caught:
            client.load_model(bad)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as absent:
        client.load_model("not_there")
    assert absent.value.status() == "StatusCode.NOT_FOUND"


def test_repo_check_on_good_and_broken_repositories(tmp_path: Path) -> None:
    good = ensure_demo_repository(tmp_path / "cache")
    ok = subprocess.run([TORCHWIRE, "repo", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "recsys" in ok.stdout and "resnet18" in ok.stdout and "FAILED" not in ok.stdout
    rows = {line.split()[0]: line for line in ok.stdout.splitlines() if line.strip()}
    assert rows["recsys"].endswith("threads 1x1 (set in config)")
    # Unset: chosen from a full batch (4 images) timed on one thread and on every core.
    chosen = re.search(r"threads 1x(\d+) \(4 items: [\d.]+ ms on 1 thread, [\d.]+x on (\d+)\)$",
                       rows["resnet18"])  # fmt: skip
    assert chosen and int(chosen[2]) == DEFAULT_TORCH_THREADS, rows["resnet18"]
    assert int(chosen[1]) in (1, DEFAULT_TORCH_THREADS)

    broken = tmp_path / "broken"
    write_model(broken / "toml", Scale(1.0), [4])
    (broken / "toml" / "config.toml").write_text("[[inputs]\n")
    write_model(broken / "noversion", Scale(1.0), [4])
    (broken / "noversion" / "1" / "model.pt").unlink()
    write_model(broken / "shape", Scale(1.0), [4])
    config = broken / "shape" / "config.toml"
    config.write_text(config.read_text() + '[[outputs]]\nname = "y"\nshape = [7]\n')
    write_model(broken / "fine", Scale(1.0), [4])
    bad = subprocess.run([TORCHWIRE, "repo", "check", str(broken)], capture_output=True, text=True)
    assert bad.returncode == 1
    lines = {line.split()[0]: line for line in bad.stdout.splitlines() if line.strip()}
    assert "not valid TOML" in bad.stdout and "FAILED" in lines["toml"]
    assert "no version directory holds a model.pt" in bad.stdout
    assert "output 'y' should be FP32[7] per item, the model gives FP32[4]" in bad.stdout
    assert "ok" in lines["fine"]


def test_variable_dimensions_batch_only_with_their_own_shape(tmp_path: Path) -> None:
    write_model(tmp_path / "var", Same(), [-1])
    with ServerThread(repository=tmp_path, watch="off") as server:
        client = triton.InferenceServerClient(url=server.target)
        try:
            done: queue.Queue[Any] = queue.Queue()
            arrays = [np.full((1, 2 + i % 3), i, np.float32) for i in range(24)]
            for i, array in enumerate(arrays):
                client.async_infer(
                    "var",
                    [_input("x", array)],
                    callback=lambda result, error, i=i: done.put((i, result, error)),
                )
            results = [done.get(timeout=30) for _ in arrays]
            assert client.get_model_metadata("var").inputs[0].shape == [-1, -1]
        finally:
            client.close()
    for i, result, error in results:
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("output"), arrays[i])


def test_unload_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    write_model(tmp_path / "busy", Busy(), [4])
    with ServerThread(repository=tmp_path, watch="off", model_control="open") as server:
        client = triton.InferenceServerClient(url=server.target)
        try:
            done: queue.Queue[Any] = queue.Queue()
            slow = np.array([[3000, 1, 0, 0]], np.float32)  # about a second of compute
            client.async_infer(
                "busy",
                [_input("x", slow)],
                callback=lambda result, error: done.put((result, error)),
            )
            busy = server.server.repository.get("busy")
            wait_until(lambda: busy.computing == 1, "the slow request computes")
            client.unload_model("busy")
            result, error = done.get(timeout=30)
            assert error is None and result.as_numpy("output").tolist() == [[3001.0]]
            assert not client.is_model_ready("busy")
        finally:
            client.close()
