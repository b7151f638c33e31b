"""The founding document's topology: torchwire replicas behind a real nginx, with the shipped
``deploy/nginx/torchwire.conf`` (its ports swapped for free ones), restarted under load."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.http as triton_http

from support import (
    CliServer,
    Scale,
    ServerThread,
    free_port,
    health_status,
    http_request,
    wait_until,
    write_model,
)
from torchwire import Client
from torchwire._proto import modelservice_messages_pb2 as pb

CONFIG = Path(__file__).parents[1] / "deploy" / "nginx" / "torchwire.conf"
ADMISSION = Path(__file__).parents[1] / "deploy" / "kubernetes-admission" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PREDICT = "/ModelService/Predict"
LIMIT = "limit_conn torchwire_inference 64;"
V2_INFER = "/inference.GRPCInferenceService/ModelInfer"
NO_INLINE = "[batching]\ninline_max_ms = 0\n"


class Nginx:
    """nginx in the foreground on the shipped config, front and replica ports substituted."""

    source = CONFIG
    http_listen = "listen 8000;"
    defaults = (50051, 50052, 8001, 8002)  # the replicas' gRPC ports, then their REST ports

    def __init__(
        self,
        prefix: Path,
        front: int,
        replicas: tuple[int, ...],
        down: int | None = None,
        limit: int | None = None,
        http_replicas: tuple[int, ...] | None = None,
    ) -> None:
        self.prefix, self.front, self.replicas, self.limit = prefix, front, replicas, limit
        # The REST front and replica ports: free ones, replicas that nobody serves unless given.
        self.http_front = free_port()
        self.http_replicas = http_replicas or tuple(free_port() for _ in replicas)
        self.config = prefix / "nginx.conf"
        prefix.mkdir(exist_ok=True)
        self.write(down)
        subprocess.run([*self._base(), "-t", "-q"], check=True, capture_output=True)
        self.process = subprocess.Popen([*self._base(), "-g", "daemon off;"])
        self.wait_listening()

    def _base(self) -> list[str]:
        return [NGINX, "-c", str(self.config), "-p", f"{self.prefix}/"]

    def write(self, down: int | None = None) -> None:
        text = self.source.read_text().replace("50050", str(self.front))
        assert self.http_listen in text
        text = text.replace(self.http_listen, f"listen {self.http_front};")
        ports = (*self.replicas, *self.http_replicas)
        for default, port in zip(self.defaults, ports, strict=True):
            assert f"server 127.0.0.1:{default} " in text
            mark = " down" if port == down else ""
            text = text.replace(f"server 127.0.0.1:{default} ", f"server 127.0.0.1:{port}{mark} ")
        if self.limit is not None:
            assert LIMIT in text
            text = text.replace(LIMIT, f"limit_conn torchwire_inference {self.limit};")
        self.config.write_text(text)

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while not any(c.laddr.port == self.front for c in psutil.net_connections("tcp")):
            assert self.process.poll() is None, "nginx exited"
            assert time.monotonic() < deadline, "nginx never listened"
            time.sleep(0.05)

    def reload(self, down: int | None = None) -> None:
        """Rewrite the config and reload; return once no worker of the old config is left."""
        self.write(down)
        old = {p.pid for p in psutil.Process(self.process.pid).children()}
        subprocess.run([*self._base(), "-s", "reload"], check=True, capture_output=True)
        deadline = time.monotonic() + 60  # the config's worker_shutdown_timeout is 10 s
        while old & {p.pid for p in psutil.Process(self.process.pid).children()}:
            error_log = (self.prefix / "error.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"old nginx workers never exited:\n{error_log}"
            time.sleep(0.05)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.front}"

    def upstreams(self) -> Counter[str]:
        """How many calls each replica answered, from nginx's access log."""
        log = (self.prefix / "access.log").read_text()
        return Counter(part.split(" ")[0] for part in log.split("upstream=")[1:])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)  # graceful
        self.process.wait(30)


class Sidecar(Nginx):
    """The Kubernetes admission sidecar's nginx (generated from the shipped config): one
    torchwire behind it, its REST front on 8080, its logs on stdout and stderr."""

    source = ADMISSION
    http_listen = "listen 8080;"
    defaults = (50051, 8000)


class OpenLoop:
    """Sends recsys requests through ``call`` at a fixed rate from a thread, whatever the
    answers; ``stop`` waits for every answer and returns the count of each outcome."""

    def __init__(self, call: object, rate: float) -> None:
        self._call = call
        self._interval = 1.0 / rate
        self._pending: list[grpc.Future] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._request = pb.PredictRequest(
            raw_inputs=np.ones(256, np.float32).tobytes(), metadata={"model": "recsys"}
        ).SerializeToString()
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        sent = 0
        while not self._stopping.is_set():
            pause = started + sent * self._interval - time.monotonic()
            if pause > 0:
                self._stopping.wait(pause)
            self._pending.append(self._call.future(self._request, timeout=30))  # type: ignore[attr-defined]
            sent += 1

    def stop(self) -> Counter[str]:
        self._stopping.set()
        self._thread.join()
        outcomes: Counter[str] = Counter()
        for future in self._pending:
            try:
                future.result()
                outcomes["OK"] += 1
            except grpc.RpcError as exc:
                outcomes[f"{exc.code().name}: {exc.details()}"] += 1
        return outcomes


@pytest.fixture
def fleet(tmp_path: Path, cache_dir: Path) -> Iterator[tuple[Nginx, dict[int, CliServer]]]:
    ports = (free_port(), free_port())
    replicas = {port: replica(port, cache_dir) for port in ports}
    for server in replicas.values():
        server.wait_ready()
    nginx = Nginx(tmp_path, free_port(), ports)
    yield nginx, replicas
    nginx.stop()
    for server in replicas.values():
        server.close()


def replica(port: int, cache_dir: Path) -> CliServer:
    return CliServer(
        "--port", str(port), "--cache-dir", str(cache_dir), "--shutdown-delay-s", "0.5"
    )  # fmt: skip


def test_the_shipped_config_passes_nginx_t(tmp_path: Path) -> None:
    result = subprocess.run(
        [NGINX, "-t", "-c", str(CONFIG), "-p", f"{tmp_path}/"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_rolling_restart_through_nginx_fails_no_request_of_a_client_that_does_not_retry(
    fleet: tuple[Nginx, dict[int, CliServer]], cache_dir: Path
) -> None:
    nginx, replicas = fleet
    # A plain channel: no retry policy. (gRPC itself still re-sends, on a new connection, a call
    # that nginx refused unread with a GOAWAY when its old workers leave at a reload.)
    with grpc.insecure_channel(nginx.target) as channel:
        load = OpenLoop(channel.unary_unary(PREDICT), rate=150)
        try:
            for port in list(replicas):
                # The procedure the config's header describes: take the replica out of nginx,
                # stop it (it drains), start the new one, put it back.
                nginx.reload(down=port)
                assert replicas[port].stop() == 0
                replicas[port].close()
                replicas[port] = replica(port, cache_dir)
                replicas[port].wait_ready()
                nginx.reload()
        finally:
            outcomes = load.stop()
    print(f"rolling restart through nginx: {dict(outcomes)}")  # shown with pytest -s
    assert set(outcomes) == {"OK"}, outcomes
    assert outcomes["OK"] > 150
    answered = nginx.upstreams()
    assert all(answered[f"127.0.0.1:{port}"] > 0 for port in replicas), answered


def test_a_replica_killed_under_load_loses_no_request_of_torchwire_client(
    fleet: tuple[Nginx, dict[int, CliServer]],
) -> None:
    nginx, replicas = fleet
    victim = next(iter(replicas.values()))
    results: Counter[str] = Counter()
    under_way, killed, done_after_kill = threading.Event(), threading.Event(), threading.Event()
    x = np.ones((1, 256), np.float32)

    def caller() -> None:
        with Client(nginx.target, timeout=10, retries=4) as client:
            while not done_after_kill.is_set():
                try:
                    client.predict("recsys", x)
                    results["OK"] += 1
                except Exception as exc:
                    results[repr(exc)] += 1
                if results["OK"] >= 500:
                    under_way.set()
                if killed.is_set() and results["OK"] >= 2000:
                    done_after_kill.set()

    callers = [threading.Thread(target=caller) for _ in range(8)]
    for thread in callers:
        thread.start()
    assert under_way.wait(60), results
    victim.process.kill()
    killed.set()
    for thread in callers:
        thread.join(120)
    assert set(results) == {"OK"}, results
    assert victim.process.wait(10) == -signal.SIGKILL
    # The kill did cut calls short (nginx logged them), and the client's retries covered them.
    assert "upstream_status=502" in (nginx.prefix / "access.log").read_text()


def _predict_request(model: str, values: list[float]) -> bytes:
    return pb.PredictRequest(
        raw_inputs=np.array(values, np.float32).tobytes(), metadata={"model": model}
    ).SerializeToString()


def _outputs(answer: bytes) -> list[float]:
    raw = pb.PredictResponse.FromString(answer).raw_outputs
    return np.frombuffer(raw, np.float32).tolist()


def _hold_model_calls(batcher: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make the model's calls wait until the returned event is set."""
    release = threading.Event()
    run_batch = batcher.model.run_batch

    def held(arrays: Any) -> Any:
        release.wait(60)
        return run_batch(arrays)

    monkeypatch.setattr(batcher.model, "run_batch", held)
    return release


@contextmanager
def _scale_server(tmp_path: Path) -> Iterator[tuple[ServerThread, Any]]:
    """``scale`` (doubles 2 values) served over gRPC and REST on free ports, its batches on its
    inference thread (inline runs off, so that a test can hold them); yields the server and the
    model's batcher."""
    write_model(tmp_path / "repo" / "scale", Scale(2.0), [2], extra=NO_INLINE)
    with ServerThread(repository=tmp_path / "repo", http_port="auto") as server:
        yield server, server.server.repository.get("scale")


def _fill(batcher: Any, send: Callable[[list[float]], Any], values: list[list[float]]) -> list[Any]:
    """Two held calls made by ``send`` with ``values``: the first computing, the second queued
    behind it; returns what ``send`` returned for each."""
    first = send(values[0])
    wait_until(lambda: batcher.computing == 1, "the first call computes")
    second = send(values[1])
    wait_until(lambda: batcher.queued_items == 1, "the second call is queued")
    return [first, second]


def test_nginx_refuses_inference_calls_beyond_its_limit_at_once_with_a_retry_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model whose calls the test holds (on its inference thread: inline runs off), behind the
    # shipped config with a limit of 2 inference calls in flight.
    with _scale_server(tmp_path) as (server, batcher):
        release = _hold_model_calls(batcher, monkeypatch)
        spare = free_port()
        nginx = Nginx(
            tmp_path / "nginx", free_port(), (server.server.port, spare), down=spare, limit=2
        )
        try:
            with grpc.insecure_channel(nginx.target) as channel:
                predict = channel.unary_unary(PREDICT)
                send = lambda v: predict.future(_predict_request("scale", v), timeout=60)  # noqa: E731
                first, second = _fill(batcher, send, [[1, 1], [2, 2]])

                # A third inference call, seed or KServe V2, is refused by nginx, never sent on.
                with pytest.raises(grpc.RpcError) as refused:
                    predict(_predict_request("scale", [3, 3]), timeout=60)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "too many inference calls in flight" in refused.value.details()
                hints = dict(refused.value.trailing_metadata())
                assert hints["torchwire-retry-after-ms"] == "50"
                assert hints["grpc-retry-pushback-ms"] == "50"
                with pytest.raises(grpc.RpcError) as refused_v2:
                    channel.unary_unary(V2_INFER)(b"", timeout=60)
                assert refused_v2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert batcher.queued_items == 1 and batcher.stats.inference_count == 0
                # Health is not an inference call: still answered through nginx.
                assert health_status(nginx.target) == "SERVING"

                release.set()
                assert _outputs(first.result()) == [2, 2]
                assert _outputs(second.result()) == [4, 4]
                assert _outputs(predict(_predict_request("scale", [3, 3]))) == [6, 6]
        finally:
            release.set()
            nginx.stop()
    log = (tmp_path / "nginx" / "access.log").read_text()
    assert log.count("grpc_status=8") == 2, log


def _infer_body(values: list[float]) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": values}]}
    ).encode()


def test_rest_requests_through_nginx_reach_the_live_replica_and_get_json_when_none_is(
    tmp_path: Path,
) -> None:
    # Two REST replicas in the config; only one runs, the other's port refuses connections (not
    # marked down): nginx tries it, fails to connect, and sends the same request to the live one.
    write_model(tmp_path / "repo" / "scale", Scale(2.0), [2])
    live_http, dead_http = free_port(), free_port()
    server = ServerThread(repository=tmp_path / "repo", http_port=live_http).start()
    stopped = False
    nginx = Nginx(
        tmp_path / "nginx", free_port(), (server.server.port, free_port()),
        http_replicas=(dead_http, live_http),
    )  # fmt: skip
    try:
        client = triton_http.InferenceServerClient(f"127.0.0.1:{nginx.http_front}")
        for i in range(8):  # Triton's own HTTP client, through nginx
            infer_input = triton_http.InferInput("x", [1, 2], "FP32")
            infer_input.set_data_from_numpy(np.array([[i, 1]], np.float32))
            answer = client.infer("scale", [infer_input]).as_numpy("output")
            assert answer.tolist() == [[2.0 * i, 2.0]]
        assert client.is_server_ready() and client.is_model_ready("scale")
        client.close()
        status, _, metadata = http_request(nginx.http_front, "GET", "/v2/models/scale")
        assert status == 200 and metadata["name"] == "scale"
        # No replica left: a JSON error and a hint, not nginx's HTML page.
        server.stop()
        stopped = True
        status, headers, body = http_request(
            nginx.http_front, "POST", "/v2/models/scale/infer", _infer_body([1, 1])
        )
        assert status == 503 and headers["Retry-After"] == "1"
        assert body == {"error": "torchwire behind nginx: no replica could answer"}
    finally:
        nginx.stop()
        if not stopped:
            server.stop()
    log = (tmp_path / "nginx" / "access.log").read_text()
    assert f"127.0.0.1:{dead_http}, 127.0.0.1:{live_http}" in log  # a request that moved over


def test_nginx_refuses_rest_inference_beyond_its_limit_with_429_and_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the gRPC admission test: a held model, a limit of 2 inference requests in flight.
    with _scale_server(tmp_path) as (server, batcher):
        release = _hold_model_calls(batcher, monkeypatch)
        spare = free_port()
        nginx = Nginx(
            tmp_path / "nginx", free_port(), (server.server.port, spare), down=spare, limit=2,
            http_replicas=(server.server.http_port, free_port()),
        )  # fmt: skip
        front = nginx.http_front
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                path = "/v2/models/scale/infer"
                post = functools.partial(http_request, front, "POST", path)
                send = lambda v: pool.submit(post, _infer_body(v))  # noqa: E731
                first, second = _fill(batcher, send, [[1, 1], [2, 2]])

                # A third is refused by nginx at once and never reaches the replica.
                status, headers, body = http_request(front, "POST", path, _infer_body([3, 3]))
                assert status == 429 and headers["Retry-After"] == "1"
                assert headers["torchwire-retry-after-ms"] == "50"
                assert "too many inference requests in flight" in body["error"]
                assert batcher.queued_items == 1 and batcher.stats.inference_count == 0
                # What is not inference is not counted: metadata and health still answer.
                assert http_request(front, "GET", "/v2/models/scale")[0] == 200
                assert http_request(front, "GET", "/v2/health/ready")[0] == 200

                release.set()
                for future, want in ((first, [2.0, 2.0]), (second, [4.0, 4.0])):
                    status, _, answer = future.result(60)
                    assert status == 200 and answer["outputs"][0]["data"] == want
        finally:
            release.set()
            nginx.stop()
    log = (tmp_path / "nginx" / "access.log").read_text()
    assert log.count(" http=429 ") == 1, log


def test_the_kubernetes_admission_sidecar_sheds_its_pods_excess_grpc_and_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # deploy/kubernetes/admission: nginx in the pod, in front of that pod's torchwire only, with
    # a limit of 2 calls of each kind in flight.
    with _scale_server(tmp_path) as (server, batcher):
        nginx = Sidecar(
            tmp_path / "nginx", free_port(), (server.server.port,), limit=2,
            http_replicas=(server.server.http_port,),
        )  # fmt: skip
        path = "/v2/models/scale/infer"
        release = threading.Event()
        try:
            with grpc.insecure_channel(nginx.target) as channel:
                predict = channel.unary_unary(PREDICT)
                assert _outputs(predict(_predict_request("scale", [1, 2]), timeout=60)) == [2, 4]
                status, _, answer = http_request(
                    nginx.http_front, "POST", path, _infer_body([3, 4])
                )
                assert status == 200 and answer["outputs"][0]["data"] == [6.0, 8.0]

                release = _hold_model_calls(batcher, monkeypatch)
                send = lambda v: predict.future(_predict_request("scale", v), timeout=60)  # noqa: E731
                held = _fill(batcher, send, [[5, 5], [6, 6]])
                with pytest.raises(grpc.RpcError) as refused:
                    predict(_predict_request("scale", [7, 7]), timeout=60)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert dict(refused.value.trailing_metadata())["torchwire-retry-after-ms"] == "50"
                assert health_status(nginx.target) == "SERVING"
                release.set()
                assert [_outputs(call.result()) for call in held] == [[10, 10], [12, 12]]

                release = _hold_model_calls(batcher, monkeypatch)
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    post = functools.partial(http_request, nginx.http_front, "POST", path)
                    requests = _fill(
                        batcher, lambda v: pool.submit(post, _infer_body(v)), [[1, 1], [2, 2]]
                    )
                    status, headers, _ = http_request(
                        nginx.http_front, "POST", path, _infer_body([3, 3])
                    )
                    assert status == 429 and headers["Retry-After"] == "1"
                    release.set()
                    assert sorted(r.result(60)[2]["outputs"][0]["data"] for r in requests) == [
                        [2.0, 2.0],
                        [4.0, 4.0],
                    ]
        finally:
            release.set()
            nginx.stop()
