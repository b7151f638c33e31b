"""What the tests share: a real server on a free port in a background thread, the seed client
generated from the founding document's proto, and small TorchScript models written to disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from torchwire.config import ServerSettings
from torchwire.server import Server

SEED_PROTO = Path(__file__).parent / "seed_proto" / "model.proto"


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

    def stop(self, grace_s: float = 5.0) -> None:
        self.run(self.server.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


class Busy(nn.Module):
    """Burns CPU for x[0, 0] rounds of matrix products, then returns the row sums: a slow model
    (TorchScript has no sleep)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(256) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounds = int(x[0, 0].item())
        y = torch.ones(256, 256)
        for _ in range(rounds):
            y = torch.tanh(y @ self.weight) + 1.0
        return x.sum(dim=1, keepdim=True) + y[0, 0] * 0.0


def write_model(
    directory: Path,
    module: nn.Module,
    shape: list[int],
    versions: dict[int, nn.Module] | None = None,
    extra: str = "",
) -> Path:
    """Write ``directory/config.toml`` and ``directory/<v>/model.pt`` for each version."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(
        f'format = "torchscript"\n[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = {shape}\n{extra}'
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


class SlowStart(nn.Module):
    """Sums each item after a fixed 3000 rounds of matrix products (about a second here), so
    that loading it (whose warm-up runs it) is slow enough to watch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(256) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ones(256, 256)
        for _ in range(3000):
            y = torch.tanh(y @ self.weight) + 1.0
        return x.sum(dim=1, keepdim=True) + y[0, 0] * 0.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
