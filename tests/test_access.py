"""Who may call and who may change what is served: bearer tokens on every API, repository control
off by default, and model files that would run smuggled code when loaded refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from support import TORCHWIRE, Scale, ServerThread, http_request, write_model
from torchwire import Client
from torchwire.config import ModelConfig, TensorSpec
from torchwire.errors import ConfigError, UnauthenticatedError
from torchwire.runtime import LoadedModel


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# one token a line\nalpha\n\nbeta\n")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo" / "scale", Scale(2.0), [4])
    return tmp_path / "repo"


def _http(
    server: ServerThread, path: str, token: str | None = None, body: bytes | None = None
) -> Any:
    status, headers, answer = http_request(
        server.server.http_port, "POST" if body is not None else "GET", path, body,
        {"Authorization": f"Bearer {token}"} if token else None,
    )  # fmt: skip
    return (status, headers) if status < 400 else (status, {**headers, **answer})


INFER = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()


def _predict(seed: SimpleNamespace, target: str, token: str | None) -> list[float]:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        request = seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata={"model": "scale"})
        return list(stub.Predict(request, timeout=10, metadata=metadata).outputs)


def _refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


def test_tokens_guard_every_api_but_health_and_follow_their_file(
    repo: Path, tokens: Path, seed: SimpleNamespace, frontend: str
) -> None:
    with ServerThread(
        repository=repo, auth_token_file=tokens, http_port="auto", grpc_frontend=frontend
    ) as server:
        target = server.target
        # gRPC, seed API: no token, a wrong one, a right one.
        missing = _refused(lambda: _predict(seed, target, None))
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "send 'authorization: Bearer <token>'" in (missing.details() or "")
        wrong = _refused(lambda: _predict(seed, target, "gamma"))
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong.details() == "the bearer token is not valid here"
        assert _predict(seed, target, "beta") == [2.0, 4.0, 6.0, 8.0]
        # A stream (which the native front end passes to grpc.aio behind it) too.
        with grpc.insecure_channel(target) as channel:
            stream = seed.grpc.ModelServiceStub(channel).PredictStream
            request = seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata={"model": "scale"})
            unsigned = _refused(lambda: list(stream(iter([request]), timeout=10)))
            assert unsigned.code() == grpc.StatusCode.UNAUTHENTICATED
            signed = stream(
                iter([request]), timeout=10, metadata=[("authorization", "Bearer beta")]
            )
            assert [list(answer.outputs) for answer in signed] == [[2.0, 4.0, 6.0, 8.0]]
        # torchwire's client, and Triton's over V2.
        with Client(target, token="alpha") as client:
            assert client.predict("scale", np.ones((1, 4), np.float32)).tolist() == [[2.0] * 4]
        with Client(target, token="nope", retries=0) as client, pytest.raises(UnauthenticatedError):
            client.predict("scale", np.ones((1, 4), np.float32))
        v2 = triton.InferenceServerClient(target)
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(InferenceServerException) as v2_missing:
            v2.infer("scale", [tensor])
        assert v2_missing.value.status() == "StatusCode.UNAUTHENTICATED"
        answer = v2.infer("scale", [tensor], headers={"authorization": "Bearer alpha"})
        assert answer.as_numpy("output").tolist() == [[2.0] * 4]
        v2.close()
        # HTTP: 401 with a challenge, then 200.
        status, refused = _http(server, "/v2/models/scale/infer", None, INFER)
        assert status == 401 and refused["WWW-Authenticate"] == "Bearer"
        assert "requires a token" in refused["error"]
        assert _http(server, "/v2/models/scale/infer", "beta", INFER)[0] == 200
        # Probes need no token.
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        assert _http(server, "/v2/health/ready")[0] == 200
        registry = server.server.metrics.registry
        for api in ("grpc", "v2_http"):
            labels = {"api": api, "reason": "unauthenticated"}
            assert registry.get_sample_value("torchwire_denied_requests_total", labels) >= 1
        # A changed file is read again: gamma in, alpha out.
        tokens.write_text("gamma\n")
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _predict(seed, target, "gamma") == [2.0, 4.0, 6.0, 8.0]
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the new token file was never read"
                time.sleep(0.1)
        assert _refused(lambda: _predict(seed, target, "alpha")).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_auth_health_guards_probes_too(repo: Path, tokens: Path) -> None:
    with ServerThread(repository=repo, auth_token_file=tokens, auth_health=True) as server:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            refused = _refused(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = health.Check(
                health_pb2.HealthCheckRequest(),
                timeout=10,
                metadata=(("authorization", "Bearer alpha"),),
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_model_control_is_off_by_default(repo: Path) -> None:
    with ServerThread(repository=repo, http_port="auto") as server:
        client = triton.InferenceServerClient(server.target)
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("scale")
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--model-control off" in refused.value.message()
        status, body = _http(server, "/v2/repository/models/scale/unload", None, b"")
        assert status == 403 and "--model-control open" in body["error"]
        assert client.is_model_ready("scale")  # still served
        client.close()


def test_model_control_token_takes_an_admin_token(repo: Path, tokens: Path, tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    admin.write_text("root\n")
    with ServerThread(
        repository=repo, http_port="auto", auth_token_file=tokens, model_control="token",
        admin_token_file=admin,
    ) as server:  # fmt: skip
        client = triton.InferenceServerClient(server.target)
        with pytest.raises(InferenceServerException) as denied:
            client.unload_model("scale", headers={"authorization": "Bearer alpha"})
        assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--admin-token-file" in denied.value.message()
        with pytest.raises(InferenceServerException) as anonymous:
            client.unload_model("scale")
        assert anonymous.value.status() == "StatusCode.UNAUTHENTICATED"
        assert _http(server, "/v2/repository/models/scale/unload", "alpha", b"")[0] == 403
        assert _http(server, "/v2/repository/models/scale/unload", None, b"")[0] == 401
        client.unload_model("scale", headers={"authorization": "Bearer root"})
        assert not client.is_model_ready("scale", headers={"authorization": "Bearer root"})
        assert _http(server, "/v2/repository/models/scale/load", "root", b"")[0] == 200
        assert client.is_model_ready("scale", headers={"authorization": "Bearer alpha"})
        client.close()
        # Each refusal counted once, by API and reason; the admitted calls not at all.
        registry = server.server.metrics.registry
        for api in ("grpc", "v2_http"):
            for reason in ("permission_denied", "unauthenticated"):
                labels = {"api": api, "reason": reason}
                count = registry.get_sample_value("torchwire_denied_requests_total", labels)
                assert count == 1, (labels, count)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--model-control", "token"], "--model-control token needs --admin-token-file"),
        (["--auth-token-file", "EMPTY"], "holds no token"),
        (["--auth-token-file", "MISSING"], "cannot read"),
    ],
)
def test_bad_access_settings_stop_the_start(
    repo: Path, tmp_path: Path, flags: list[str], says: str
) -> None:
    (tmp_path / "EMPTY").write_text("# nothing\n\n")
    flags = [str(tmp_path / f) if f in ("EMPTY", "MISSING") else f for f in flags]
    result = subprocess.run(
        [TORCHWIRE, "serve", "--repository", str(repo), "--port", "0", "--http-port", "0",
         "--metrics-port", "0", *flags],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert says in result.stderr


def test_bench_and_predict_send_the_token_file(repo: Path, tokens: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.write_text("beta\n")
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    with ServerThread(repository=repo, auth_token_file=tokens) as server:
        common = ["--target", server.target, "--model", "scale"]
        bench = [TORCHWIRE, "bench", *common, "--duration", "1", "--warmup", "0.2", "--quiet"]
        ok = subprocess.run([*bench, "--token-file", str(mine)], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run(
            [TORCHWIRE, "predict", *common, "--input", str(tmp_path / "x.npy")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr + refused.stdout
        answered = subprocess.run(
            [TORCHWIRE, "predict", *common, "--input", str(tmp_path / "x.npy"), "--output",
             str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "TORCHWIRE_TOKEN": "alpha"},
        )  # fmt: skip
        assert answered.returncode == 0, answered.stderr
        assert np.load(tmp_path / "y.npy").tolist() == [[2.0] * 4]


# -- model files that would run smuggled code ---------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _Payload:
    """Unpickling it creates ``marker``: what an attacker's code would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _smuggle(clean: Path, out: Path, part: str, marker: Path) -> Path:
    """``clean`` with one part replaced by a pickle that runs code when unpickled."""
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    replaced = {"weights": "data/weights/weight_0", "samples": "sample_inputs/model.pt"}[part]
    with zipfile.ZipFile(clean) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if part == "weights" and item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["layer.weight"]["use_pickle"] = True  # "unpickle this weight"
                data = json.dumps(config).encode()
            elif item.filename.endswith(replaced):
                data = payload.getvalue()
            zout.writestr(item, data)
    return out


@pytest.mark.parametrize("part", ["weights", "samples"])
def test_an_exported_model_that_would_unpickle_objects_is_refused(
    tmp_path: Path, part: str
) -> None:
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(_Tiny(), (torch.zeros(2, 3),)), str(clean))
    config = ModelConfig(format="exported", inputs=[TensorSpec(name="x", dtype="FP32", shape=(3,))])
    LoadedModel.load(clean, config)  # plain tensors load
    # The attack is real: torch itself runs the payload.
    marker = tmp_path / f"ran-{part}"
    with contextlib.suppress(Exception):  # the payload runs before torch finds the file odd
        torch.export.load(str(_smuggle(clean, tmp_path / "torch.pt2", part, marker)))
    assert marker.exists()
    # torchwire refuses the file before torch reads it, saying why.
    marker = tmp_path / f"torchwire-{part}"
    evil = _smuggle(clean, tmp_path / "evil.pt2", part, marker)
    with pytest.raises(ConfigError) as refused:
        LoadedModel.load(evil, config)
    assert "refused" in str(refused.value) and "unpickle" in str(refused.value)
    assert not marker.exists()
