"""What the tests share: a real server on a free port in a background thread, the seed client
generated from the founding document's proto, and small TorchScript models written to disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from torchwire.config import ServerSettings
from torchwire.server import Server

SEED_PROTO = Path(__file__).parent / "seed_proto" / "model.proto"
TORCHWIRE = str(Path(sys.executable).parent / "torchwire")
BANNER = re.compile(r"torchwire serving on [^ ]+:(\d+) \(gRPC")
METRICS_LINE = re.compile(r"metrics: http://[^ ]+:(\d+)/metrics")
GATES: dict[str, threading.Event] = {}
"""Events a test's model.py waits on or sets (a Python model runs in the test's process)."""


def compile_seed_client(out: Path) -> tuple[ModuleType, ModuleType]:
    """Generate ``model_pb2``/``model_pb2_grpc`` from the unchanged founding proto; import them."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "protoc",
            f"-I{SEED_PROTO.parent}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(SEED_PROTO),
        ]
    )
    assert code == 0, "protoc failed on the seed proto"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("model_pb2"), importlib.import_module("model_pb2_grpc")
    finally:
        sys.path.remove(str(out))


class ServerThread:
    """A real ``torchwire.server.Server`` on its own event loop in a background thread."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        settings.setdefault("metrics_host", "127.0.0.1")
        settings.setdefault("metrics_port", 0)
        settings.setdefault("http_port", 0)  # off unless a test gives it a free port
        self.settings = ServerSettings(**settings)
        self.server = Server(self.settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def begin(self) -> concurrent.futures.Future[int]:
        """Start without waiting: the future resolves once the models are loaded."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)

    def start(self) -> ServerThread:
        self.begin().result(timeout=120)
        return self

    def run(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def begin_stop(self, grace_s: float = 5.0) -> concurrent.futures.Future[bool]:
        """Start stopping the server without waiting (``close`` once it has stopped)."""
        return asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self.loop)

    def stop(self, grace_s: float = 5.0) -> None:
        self.begin_stop(grace_s).result(60)
        self.close()

    def close(self) -> None:
        """End the event loop of a stopped server."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connection(target: str) -> grpc.Channel:
    """A channel with a connection of its own (channels otherwise share subchannels)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def health_status(target: str, service: str = "") -> str:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# -- small models written to disk ---------------------------------------------------------------


class Scale(nn.Module):
    """y = x * factor, per item: outputs tell versions and requests apart."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Poisoned(nn.Module):
    """Sums each item, but raises on any batch that contains the value 666."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 666.0).any()):
            raise ValueError("poisoned input: 666")
        return x.sum(dim=1, keepdim=True)


class Held(nn.Module):
    """Doubles its input and notes each call's batch size (``calls``). An item of -1 holds its
    call until ``release`` is set (``entered`` says it is held): requests sent meanwhile queue
    and form the next batch together. A subclass fails the calls it chooses in ``fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        if bool((x == -1).any()):
            self.entered.set()
            assert self.release.wait(30)
        self.fail(x)
        return x * 2

    def fail(self, x: torch.Tensor) -> None:
        """Raise to fail this call (nothing here)."""


class DeviceFault(nn.Module):
    """Sums each item; a batch holding ``trigger`` (-3; 0 fails the warm-up) fails as a GPU does
    after a device-side assert, with CUDA's message (TorchScript raises its own error type,
    carrying it). On the CPU nothing can check the device: torchwire takes it as failed."""

    def __init__(self, trigger: float = -3.0) -> None:
        super().__init__()
        self.trigger = trigger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == self.trigger).any()):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return x.sum(dim=1, keepdim=True)


class Busy(nn.Module):
    """Burns CPU for x[0, 0] + 10 rounds of matrix products, then returns the row sums: a slow
    model (TorchScript has no sleep), too slow to run on the event loop even on zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(256) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounds = int(x[0, 0].item()) + 10
        y = torch.ones(256, 256)
        for _ in range(rounds):
            y = torch.tanh(y @ self.weight) + 1.0
        return x.sum(dim=1, keepdim=True) + y[0, 0] * 0.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Gate on a state of the server (no fixed sleep standing in for "long enough")."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def write_model(
    directory: Path,
    module: nn.Module,
    shape: list[int],
    versions: dict[int, nn.Module] | None = None,
    extra: str = "",
    dtype: str = "FP32",
) -> Path:
    """Write ``directory/config.toml`` (one input ``x`` of ``dtype``) and
    ``directory/<v>/model.pt`` for each version."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(
        f'format = "torchscript"\n[[inputs]]\nname = "x"\ndtype = "{dtype}"\n'
        f"shape = {shape}\n{extra}"
    )
    for version, mod in (versions or {1: module}).items():
        (directory / str(version)).mkdir(exist_ok=True)
        torch.jit.script(mod.eval()).save(str(directory / str(version) / "model.pt"))
    return directory


def in_process(path: Path) -> Callable[[Any], Any]:
    """The model file called directly, the reference every answer is compared with."""
    model = torch.jit.load(str(path)).eval()

    def call(array: Any) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(array)).numpy()

    return call


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP request to ``127.0.0.1:port``, as curl would send it: its status, headers
    and parsed JSON body (``{}`` when empty). Error statuses are returned, not raised."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


def free_port() -> int:
    """A port nothing listens on now. Servers of ours bind port 0 and report theirs; this is for
    what must be told a port before it binds (nginx's own ports) or a port where no server is
    (a dead replica)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CliServer:
    """`torchwire serve ...` in a child process; the port is read from its start-up banner, and
    tests wait for the lines it logs (``wait_for``) instead of sleeping."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [TORCHWIRE, "serve", "--host", "127.0.0.1", "--metrics-host", "127.0.0.1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                "TORCHWIRE_METRICS_PORT": "0",
                "TORCHWIRE_HTTP_PORT": "0",  # off unless a test asks for it
                **(env or {}),
            },
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._ready = threading.Event()
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            if match := BANNER.search(line):
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()
        with self._new_line:
            self._new_line.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> str:
        assert self._ready.wait(timeout), f"no start-up banner:\n{self.output}"
        assert self._port is not None, f"server exited before serving:\n{self.output}"
        return f"127.0.0.1:{self._port}"

    def metrics_url(self) -> str:
        port = self.wait_for(METRICS_LINE.pattern)[0].group(1)
        return f"http://127.0.0.1:{port}/metrics"

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> list[re.Match[str]]:
        """Wait until ``count`` logged lines match ``pattern``; return the matches."""
        regex = re.compile(pattern)

        def found() -> list[re.Match[str]]:
            return [m for line in self.lines if (m := regex.search(line))]

        with self._new_line:
            done = self._new_line.wait_for(
                lambda: len(found()) >= count or not self._reader.is_alive(), timeout
            )
            matches = found()
        assert done and len(matches) >= count, f"never logged {pattern!r}:\n{self.output}"
        return matches

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:  # stopped in order, so that workers go too
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


def seed_predict(
    target: str, seed: SimpleNamespace, inputs: list[float], request_id: str, model: str = "scale"
) -> list[float]:
    """One founding-API ``Predict`` on a connection of its own (the kernel picks the worker)."""
    with connection(target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        request = seed.pb2.PredictRequest(inputs=inputs, metadata={"model": model})
        answer = stub.Predict(request, timeout=30, metadata=[("x-request-id", request_id)])
        return list(answer.outputs)


def metric_samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples named ``name`` on a /metrics page: (labels, value)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


WORDS_CONFIG = """\
format = "python"
[[inputs]]
name = "text"
dtype = "BYTES"
shape = [1]
[[outputs]]
name = "length"
dtype = "INT64"
shape = [1]
[[outputs]]
name = "loud"
dtype = "BYTES"
shape = [1]
"""
WORDS_MODEL = """\
import numpy as np
import torch


class Model:
    def example(self):
        return {"text": np.array([[b"warm"]], dtype=object)}

    def preprocess(self, request):
        return {"length": np.array([[len(t)] for t in request["text"][:, 0]], dtype=np.int64)}

    def predict(self, inputs):
        return {"length": inputs["length"] * 1}

    def postprocess(self, answer):
        lengths = answer["length"][:, 0]
        return {"loud": np.array([[b"!" * int(n)] for n in lengths], dtype=object), **answer}
"""


def write_words_model(directory: Path) -> Path:
    """A Python model in its own process's terms (no test imports): BYTES ``text`` in, its
    ``length`` (INT64, from preprocess and predict) and ``loud`` (BYTES, that many "!", from
    postprocess) out."""
    (directory / "1").mkdir(parents=True)
    (directory / "config.toml").write_text(WORDS_CONFIG)
    (directory / "1" / "model.py").write_text(WORDS_MODEL)
    return directory
