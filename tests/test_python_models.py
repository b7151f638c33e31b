"""Python models (``format = "python"``), BYTES tensors and AOTInductor packages, as a user who
serves a JPEG classifier, a text model and a compiled ranking model meets them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import logging
import os
import shutil
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

import support
from support import ServerThread, http_request, in_process, wait_until, write_model
from torchwire.config import ModelConfig, load_model_config
from torchwire.errors import ConfigError
from torchwire.repository.check import check_repository
from torchwire.repository.demo import compiler_found
from torchwire.repository.vision_model import example_image
from torchwire.runtime import Batcher, LoadedModel

FAST_WATCH = {"watch_interval_s": 0.1, "watch_settle_s": 0.3}
NEEDS_COMPILER = pytest.mark.skipif(
    compiler_found() is None, reason="no C++ compiler: AOTInductor cannot build (CI installs g++)"
)

TEXT_CONFIG = """\
format = "python"
[[inputs]]
name = "text"
dtype = "BYTES"
shape = [1]
[[outputs]]
name = "upper"
dtype = "BYTES"
shape = [1]
[[outputs]]
name = "length"
dtype = "INT64"
shape = [1]
[batching]
max_batch_size = 8
max_queue = 8
"""

# Lengths are computed by predict on a batch; upper-casing is postprocess, per request. A text
# "fail-post" makes postprocess raise, "fail-predict" makes predict raise, "hold" waits on the
# test's gate (support.GATES["hold"]) in preprocess.
TEXT_MODEL = """\
import numpy as np
import torch

import support


class Model:
    def setup(self, device):
        self.device = device

    def example(self):
        return {"text": np.array([[b"warm"]], dtype=object)}

    def preprocess(self, request):
        texts = request["text"][:, 0]
        if any(t == b"hold" for t in texts):
            support.GATES["held"].set()
            support.GATES["hold"].wait(30)
        if any(t == b"" for t in texts):
            raise ValueError("input 'text': empty strings are not accepted")
        lengths = torch.tensor([[len(t)] for t in texts], dtype=torch.int64)
        return {"lengths": lengths, "text": request["text"]}

    def predict(self, inputs):
        if any(t == b"fail-predict" for t in inputs["text"][:, 0]):
            raise RuntimeError("predict was told to fail")
        return {"length": inputs["lengths"] * 1, "text": inputs["text"]}

    def postprocess(self, answer):
        if answer["text"][0, 0] == b"fail-post":
            raise KeyError("postprocess was told to fail")
        if answer["text"][0, 0] == b"bad-bytes":  # not bytes: the server must not send it
            return {"upper": np.array([[3]], dtype=object), "length": answer["length"]}
        upper = np.array([[t.upper()] for t in answer["text"][:, 0]], dtype=object)
        return {"upper": upper, "length": answer["length"]}
"""


def write_python_model(directory: Path, config: str, sources: dict[int, str]) -> Path:
    """``directory/config.toml`` and ``directory/<version>/model.py`` for each version."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(config)
    for version, source in sources.items():
        (directory / str(version)).mkdir(exist_ok=True)
        (directory / str(version) / "model.py").write_text(textwrap.dedent(source))
    return directory


@pytest.fixture(scope="module")
def gates() -> Iterator[dict[str, threading.Event]]:
    support.GATES.update(hold=threading.Event(), held=threading.Event())
    yield support.GATES
    support.GATES["hold"].set()


@pytest.fixture(scope="module")
def server(
    demo_repo: Path,
    tmp_path_factory: pytest.TempPathFactory,
    frontend: str,
    gates: dict[str, threading.Event],
) -> Iterator[ServerThread]:
    """The demo's vision and recsys models (TorchScript and AOTInductor) and the text model,
    over gRPC and HTTP."""
    root = tmp_path_factory.mktemp("python-repo")
    for name in ("vision", "recsys", "recsys-aoti"):
        if (demo_repo / name).exists():  # recsys-aoti: where a C++ compiler built it
            (root / name).symlink_to(demo_repo / name)
    write_python_model(root / "text", TEXT_CONFIG, {1: TEXT_MODEL})
    with ServerThread(
        repository=root, http_port="auto", grpc_frontend=frontend, watch="off"
    ) as server:
        yield server


def in_process_vision(demo_repo: Path, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The same pipeline, run here: the demo's model.py, its preprocess then its predict."""
    path = demo_repo / "vision" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("vision_in_process", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.setup(torch.device("cpu"))
    with torch.inference_mode():
        prepared = model.preprocess({"image": np.array([[i] for i in images], dtype=object)})
        answer = model.predict({"image": torch.from_numpy(prepared["image"])})
    return answer["classes"].numpy(), answer["scores"].numpy()


def test_a_jpeg_and_a_png_get_the_top5_of_the_same_pipeline_in_process(
    server: ServerThread, demo_repo: Path
) -> None:
    images = [example_image("JPEG"), example_image("PNG")]
    classes, scores = in_process_vision(demo_repo, images)
    sent = np.array([[image] for image in images], dtype=object)
    clients = [
        (triton_grpc, triton_grpc.InferenceServerClient(server.target)),
        (triton_http, triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")),
    ]
    for module, client in clients:
        image = module.InferInput("image", [2, 1], "BYTES")
        image.set_data_from_numpy(sent)
        answer = client.infer("vision", [image])
        np.testing.assert_allclose(answer.as_numpy("scores"), scores, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(answer.as_numpy("classes"), classes)
        client.close()


def test_metadata_and_config_of_a_python_model_as_triton_gives_them(server: ServerThread) -> None:
    client = triton_grpc.InferenceServerClient(server.target)
    metadata = client.get_model_metadata("vision", as_json=True)
    assert metadata["platform"] == "python"
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1", "1"]}]
    config = client.get_model_config("vision", as_json=True)["config"]
    assert config["input"][0]["data_type"] == "TYPE_STRING"
    assert [o["name"] for o in config["output"]] == ["classes", "scores"]
    http = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    assert http.get_model_metadata("vision")["platform"] == "python"
    assert http.get_model_config("vision")["input"][0]["data_type"] == "TYPE_STRING"
    client.close()
    http.close()


def test_a_corrupt_jpeg_is_refused_by_name_and_its_batchmates_are_answered(
    server: ServerThread,
) -> None:
    good = np.array([[example_image()]], dtype=object)
    corrupt = np.array([[example_image()[:200] + b"\x00" * 50]], dtype=object)
    client = triton_grpc.InferenceServerClient(server.target)

    def ask(data: np.ndarray) -> Any:
        image = triton_grpc.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(data)
        return client.infer("vision", [image]).as_numpy("classes")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(ask, corrupt if i % 3 == 1 else good) for i in range(6)]
        outcomes = [call.exception() or call.result() for call in calls]
    for index, outcome in enumerate(outcomes):
        if index % 3 == 1:
            assert isinstance(outcome, InferenceServerException)
            assert outcome.status() == "StatusCode.INVALID_ARGUMENT"
            assert "input 'image' item 0" in outcome.message()
            assert "vision/1/model.py:" in outcome.message()  # the line, not the server's path
            assert str(server.server.settings.repository) not in outcome.message()
        else:
            assert isinstance(outcome, np.ndarray) and outcome.shape == (1, 5)
    client.close()
    status, _, body = _rest_infer(server, "vision", [_rest_bytes("image", [b"GIF89a.."])])
    assert status == 400 and "input 'image' item 0: not an image" in body["error"]


def _rest_bytes(name: str, values: list[bytes]) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": "BYTES",
        "shape": [len(values), 1],
        "data": [v.decode("latin-1") for v in values],
    }


def _rest_infer(server: ServerThread, model: str, inputs: list[Any], **extra: Any) -> Any:
    body = json.dumps({"inputs": inputs, **extra}).encode()
    port = server.server.http_port
    assert port is not None
    return http_request(port, "POST", f"/v2/models/{model}/infer", body)


def test_bytes_travel_every_way_v2_carries_them(server: ServerThread) -> None:
    texts = np.array([[b"hello"], ["wörld".encode()]], dtype=object)
    want_upper = [[b"HELLO"], ["WöRLD".encode()]]
    # gRPC, raw contents (4-byte length prefixes), as tritonclient sends them.
    client = triton_grpc.InferenceServerClient(server.target)
    text = triton_grpc.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(texts)
    answer = client.infer("text", [text])
    assert answer.as_numpy("upper").tolist() == want_upper
    assert answer.as_numpy("length").tolist() == [[5], [6]]
    client.close()
    # gRPC, typed bytes_contents.
    request = pb.ModelInferRequest(model_name="text")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    tensor.contents.bytes_contents.extend([b"ab", b"xyz"])
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = infer(request, timeout=30)
    assert [o.datatype for o in response.outputs] == ["BYTES", "INT64"]
    assert response.raw_output_contents[0] == b"\x02\x00\x00\x00AB\x03\x00\x00\x00XYZ"
    # REST: JSON strings in and out, and binary data in and out through tritonclient.http.
    status, _, body = _rest_infer(server, "text", [_rest_bytes("text", [b"json"])])
    assert status == 200, body
    assert body["outputs"][0] == {
        "name": "upper",
        "datatype": "BYTES",
        "shape": [1, 1],
        "data": ["JSON"],
    }
    http = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    for binary in (True, False):
        text = triton_http.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(texts, binary_data=binary)
        outputs = [
            triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("upper", "length")
        ]
        answer = http.infer("text", [text], outputs=outputs)
        upper = answer.as_numpy("upper")
        assert [
            [v if isinstance(v, bytes) else v.encode() for v in row] for row in upper.tolist()
        ] == want_upper
    http.close()


def test_malformed_bytes_are_refused_saying_what_was_wrong(server: ServerThread) -> None:
    cases = {
        b"\x05\x00\x00\x00abc": "claims 5 bytes; 3 are left",
        b"\x01\x00\x00\x00a\x01\x00": "ends at element 1 of 2",
        b"\x01\x00\x00\x00a\x01\x00\x00\x00bEXTRA": "5 bytes after its 2 elements",
    }
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for raw, said in cases.items():
            request = pb.ModelInferRequest(model_name="text", raw_input_contents=[raw])
            request.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
            with pytest.raises(grpc.RpcError) as caught:
                infer(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert said in caught.value.details()
    status, _, body = _rest_infer(
        server, "text", [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [7]}]
    )
    assert status == 400 and "send strings" in body["error"]
    # JSON that the json module reads but that is no text: a lone surrogate.
    body = b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1,1],"data":["\\ud800"]}]}'
    port = server.server.http_port
    assert port is not None
    status, _, answer = http_request(port, "POST", "/v2/models/text/infer", body)
    assert status == 400 and "not valid Unicode" in answer["error"]
    # A refusal of preprocess is INVALID_ARGUMENT too.
    status, _, body = _rest_infer(server, "text", [_rest_bytes("text", [b""])])
    assert status == 400 and "empty strings are not accepted" in body["error"]


def test_a_failing_request_fails_alone_in_its_batch(server: ServerThread) -> None:
    client = triton_grpc.InferenceServerClient(server.target)

    def ask(word: bytes) -> Any:
        text = triton_grpc.InferInput("text", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[word]], dtype=object))
        return client.infer("text", [text]).as_numpy("upper")[0, 0]

    words = [b"fail-predict", b"fail-post", b"bad-bytes", b"ok1", b"ok2", b"ok3", b"ok4"]
    with concurrent.futures.ThreadPoolExecutor(len(words)) as pool:
        calls = {word: pool.submit(ask, word) for word in words}
    for word, call in calls.items():
        if word.startswith((b"fail", b"bad")):
            error = call.exception()
            assert isinstance(error, InferenceServerException)
            assert error.status() == "StatusCode.INTERNAL"
            if word == b"bad-bytes":
                assert "output 'upper' is BYTES" in error.message(), error.message()
                assert "holding other objects" in error.message()
                continue
            step = "predict" if word == b"fail-predict" else "postprocess"
            assert f"{step} raised (" in error.message() and "text/1/model.py:" in error.message()
        else:
            assert call.result() == word.upper()
    client.close()


def test_requests_being_preprocessed_count_against_the_queue(
    server: ServerThread, gates: dict[str, threading.Event]
) -> None:
    """max_queue = 8: a held request of 8 items fills it while in preprocess; the next is
    refused at once with RESOURCE_EXHAUSTED; once released, both kinds are answered."""
    gates["hold"].clear()
    gates["held"].clear()
    client = triton_grpc.InferenceServerClient(server.target)

    def ask(words: list[bytes]) -> Any:
        text = triton_grpc.InferInput("text", [len(words), 1], "BYTES")
        text.set_data_from_numpy(np.array([[w] for w in words], dtype=object))
        return client.infer("text", [text]).as_numpy("length")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(ask, [b"hold"] * 8)
        assert gates["held"].wait(30)
        with pytest.raises(InferenceServerException) as refused:
            ask([b"next"])
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue full" in refused.value.message()
        gates["hold"].set()
        assert held.result(timeout=30).tolist() == [[4]] * 8
    assert ask([b"next"]).tolist() == [[4]]
    client.close()


@NEEDS_COMPILER
def test_recsys_as_aotinductor_answers_as_torchscript(
    server: ServerThread, demo_repo: Path
) -> None:
    features = np.random.default_rng(3).random((5, 256), dtype=np.float32)
    expected = in_process(demo_repo / "recsys/1/model.pt")(features)
    client = triton_grpc.InferenceServerClient(server.target)
    for model in ("recsys", "recsys-aoti"):
        tensor = triton_grpc.InferInput("features", [5, 256], "FP32")
        tensor.set_data_from_numpy(features)
        got = client.infer(model, [tensor]).as_numpy("score")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    client.close()


# -- at load and at reload -------------------------------------------------------------------

SCALE_CONFIG = """\
format = "python"
[[inputs]]
name = "x"
dtype = "FP32"
shape = [4]
[[outputs]]
name = "y"
dtype = "FP32"
shape = [4]
"""

SCALE = """\
class Model:
    def predict(self, inputs):
        return {{"y": inputs["x"] * {factor}}}
"""

BAD_MODELS = {
    "syntax error": (
        "class Model:\n    def predict(self, inputs)\n        return {}\n",
        ":2: syntax error",
    ),
    "raises in setup": (
        "class Model:\n    def setup(self, device):\n"
        "        raise RuntimeError('no weights here')\n"
        "    def predict(self, inputs):\n        return inputs\n",
        ":3: setup raised RuntimeError: no weights here",
    ),
    "wrong shape": (
        "class Model:\n    def predict(self, inputs):\n        return {'y': inputs['x'][:, :3]}\n",
        "model.py:2 (predict): output 'y' should be FP32[4] per item, got [3]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_bad_model_py_is_a_clear_error_at_load(tmp_path: Path, case: str) -> None:
    source, said = BAD_MODELS[case]
    write_python_model(tmp_path / "m", SCALE_CONFIG, {1: source})
    (row,) = check_repository(tmp_path)
    assert not row.ok
    assert str(tmp_path / "m" / "1" / "model.py") in row.detail and said in row.detail, row.detail


def test_a_bad_model_py_at_reload_leaves_the_serving_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_python_model(tmp_path / "m", SCALE_CONFIG, {1: SCALE.format(factor=2)}) / "1"
    x = np.arange(4, dtype=np.float32).reshape(1, 4)

    def ask(client: triton_grpc.InferenceServerClient) -> list[float]:
        tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer("m", [tensor]).as_numpy("y").tolist()[0]

    caplog.set_level(logging.WARNING)
    with ServerThread(repository=tmp_path, **FAST_WATCH) as server:
        client = triton_grpc.InferenceServerClient(server.target)
        assert ask(client) == [0, 2, 4, 6]
        for failures, case in enumerate(sorted(BAD_MODELS), 1):
            _replace(path / "model.py", BAD_MODELS[case][0])
            wait_until(lambda n=failures: _loads(server, "failed") == n, f"{case} to fail")
            assert ask(client) == [0, 2, 4, 6]
            assert BAD_MODELS[case][1] in caplog.text
        # A good model.py is new code: it serves at once.
        _replace(path / "model.py", SCALE.format(factor=3))
        wait_until(lambda: ask(client) == [0, 3, 6, 9], "the new model.py to serve")
        client.close()


def _replace(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _loads(server: ServerThread, outcome: str) -> float:
    labels = {"model": "m", "outcome": outcome}
    return (
        server.server.metrics.registry.get_sample_value("torchwire_model_loads_total", labels)
        or 0.0
    )


def test_helpers_beside_model_py_are_imported_relative_to_it(tmp_path: Path) -> None:
    directory = write_python_model(
        tmp_path / "m",
        SCALE_CONFIG,
        {
            1: "from . import helpers\nfrom .helpers import FACTOR\n\nclass Model:\n"
            "    def predict(self, inputs):\n"
            "        return {'y': inputs['x'] * FACTOR * helpers.ONE}\n"
        },
    )
    (directory / "1" / "helpers.py").write_text("FACTOR = 5\nONE = 1\n")
    config = load_model_config(directory / "config.toml")
    before = set(sys.modules)
    model = LoadedModel.load(directory / "1" / "model.py", config)
    model.warm_up()
    assert model.run_batch([[np.ones((2, 4), np.float32)]])[0].tolist() == [[5.0] * 4] * 2
    loaded = {name for name in set(sys.modules) - before if name.startswith("torchwire_models.")}
    assert len(loaded) == 2 and any(name.endswith(".helpers") for name in loaded), loaded
    model.release()
    assert not loaded & set(sys.modules)  # model.py and its helpers are gone


@pytest.mark.parametrize(
    ("config", "said"),
    [
        (
            'format = "torchscript"\n[[inputs]]\nname = "t"\ndtype = "BYTES"\nshape = [1]\n',
            "BYTES tensors ('t') need format = \"python\"",
        ),
        (
            'format = "python"\n[[inputs]]\nname = "x"\nshape = [1]\n',
            "a Python model declares its [[outputs]]",
        ),
        (
            'format = "exported"\n[[inputs]]\nname = "x"\nshape = [1]\n'
            '[compile]\nmode = "default"\n',
            '[compile] applies to format = "python"',
        ),
    ],
)
def test_configs_that_cannot_work_say_why(tmp_path: Path, config: str, said: str) -> None:
    (tmp_path / "config.toml").write_text(config)
    with pytest.raises(ConfigError, match=None) as caught:
        load_model_config(tmp_path / "config.toml")
    assert said in str(caught.value)


@NEEDS_COMPILER
def test_an_aotinductor_package_served_as_exported_is_refused_naming_the_format(
    demo_repo: Path, tmp_path: Path
) -> None:
    shutil.copytree(demo_repo / "recsys-aoti", tmp_path / "m")
    config_path = tmp_path / "m" / "config.toml"
    config_path.write_text(config_path.read_text().replace('"aoti"', '"exported"'))
    config: ModelConfig = load_model_config(config_path)
    with pytest.raises(ConfigError, match='serve it with format = "aoti"'):
        LoadedModel.load(tmp_path / "m" / "1" / "model.pt2", config)


def test_a_torchscript_model_beside_python_ones_is_unchanged(tmp_path: Path) -> None:
    write_model(tmp_path / "ts", support.Scale(2.0), [4])
    write_python_model(tmp_path / "py", SCALE_CONFIG, {1: SCALE.format(factor=2)})
    rows = check_repository(tmp_path)
    assert [(r.model, r.ok) for r in rows] == [("py", True), ("ts", True)], rows


COMPILED = """\
import torch


class Model:
    def setup(self, device):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
        ).to(device)

    def predict(self, inputs):
        y = torch.tanh(self.net(inputs["x"])) * 2
        if {graph_break}:
            torch._dynamo.graph_break()
        return {{"y": y}}
"""


@NEEDS_COMPILER  # inductor compiles C++ on a CPU
def test_torch_compile_of_predict_answers_as_eager_and_fullgraph_refuses_breaks(
    tmp_path: Path,
) -> None:
    eager = write_python_model(
        tmp_path / "eager", SCALE_CONFIG, {1: COMPILED.format(graph_break=False)}
    )
    compiled = write_python_model(
        tmp_path / "compiled",
        SCALE_CONFIG + '[compile]\nmode = "default"\ndynamic = true\n',
        {1: COMPILED.format(graph_break=False)},
    )
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    answers = []
    for directory in (eager, compiled):
        model = LoadedModel.load(
            directory / "1" / "model.py", load_model_config(directory / "config.toml")
        )
        model.warm_up()
        answers.append(model.run_batch([[x]])[0])
        model.release()
    np.testing.assert_allclose(answers[1], answers[0], rtol=1e-5, atol=1e-6)
    write_python_model(
        tmp_path / "strict",
        SCALE_CONFIG + '[compile]\nmode = "default"\nfullgraph = true\n',
        {1: COMPILED.format(graph_break=True)},
    )
    (row,) = [r for r in check_repository(tmp_path) if r.model == "strict"]
    assert not row.ok and "strict/1/model.py" in row.detail and "graph_break" in row.detail, (
        row.detail
    )


HELD = """\
import support


class Model:
    def preprocess(self, request):
        if request["x"][0, 0] == 7:
            support.GATES["held"].set()
            support.GATES["hold"].wait(30)
        return request

    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""


def test_closing_a_version_waits_for_requests_in_preprocess_with_several_instances(
    tmp_path: Path, gates: dict[str, threading.Event]
) -> None:
    """close() while a request is in preprocess: every inference thread waits for it, it is
    answered, and then all of them stop (two instances, no postprocess: each thread must be
    woken by the request's arrival, not only the one that takes it)."""
    gates["hold"].clear()
    gates["held"].clear()
    config = SCALE_CONFIG + "[instances]\ncount = 2\n"
    directory = write_python_model(tmp_path / "m", config, {1: HELD})
    model = LoadedModel.load(
        directory / "1" / "model.py", load_model_config(directory / "config.toml")
    )
    model.warm_up()

    async def main() -> tuple[bool, list[list[float]]]:
        batcher = Batcher(model, "m", 1)
        batcher.start(asyncio.get_running_loop())
        held = batcher.submit([np.full((1, 4), 7, np.float32)], 1)
        await asyncio.to_thread(gates["held"].wait, 30)
        closing = asyncio.ensure_future(batcher.close(timeout_s=10))
        # Both inference threads back asleep, woken by close() and waiting for the request:
        # (threading.Condition keeps its sleepers in _waiters).
        await asyncio.to_thread(
            wait_until,
            lambda: len(batcher._cond._waiters) == 2,
            "both threads to wait",  # type: ignore[attr-defined]
        )
        gates["hold"].set()
        answer = await asyncio.wait_for(held, 20)
        return await asyncio.wait_for(closing, 20), answer[0].tolist()

    closed, doubled = asyncio.run(main())
    assert doubled == [[14.0] * 4]
    assert closed  # False: an inference thread was never woken, and the model never released
