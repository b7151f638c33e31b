from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from support import (
    Busy,
    CliServer,
    Poisoned,
    Scale,
    ServerThread,
    compile_seed_client,
    write_model,
)
from torchwire.repository import ensure_demo_repository


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the demo repository, built once per test session."""
    path = tmp_path_factory.mktemp("cache")
    ensure_demo_repository(path)
    return path


@pytest.fixture(scope="session")
def demo_repo(cache_dir: Path) -> Path:
    return ensure_demo_repository(cache_dir)


@pytest.fixture
def cli_servers() -> Iterator[list[CliServer]]:
    """`torchwire serve` processes a test starts (append them): each is closed after it."""
    servers: list[CliServer] = []
    yield servers
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The client generated from the founding document's proto, unchanged."""
    pb2, pb2_grpc = compile_seed_client(tmp_path_factory.mktemp("seed_client"))
    return SimpleNamespace(pb2=pb2, grpc=pb2_grpc)


@pytest.fixture(scope="session", params=["native", "aio"])
def frontend(request: pytest.FixtureRequest) -> str:
    """The gRPC front end (``--grpc-frontend``): the servers of the shared fixtures run on each."""
    return str(request.param)


@pytest.fixture(scope="session")
def demo_server(cache_dir: Path, frontend: str) -> Iterator[ServerThread]:
    """torchwire serving the built-in demo repository, as `torchwire serve` with no model does."""
    with ServerThread(cache_dir=cache_dir, grpc_frontend=frontend) as server:
        assert server.server.grpc_frontend == frontend
        yield server


@pytest.fixture(scope="session")
def test_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of small models: two versions of `scale`, a poisoned and a busy model."""
    root = tmp_path_factory.mktemp("repo")
    write_model(
        root / "scale",
        Scale(2.0),
        [4],
        versions={1: Scale(2.0), 2: Scale(3.0)},
        extra='[versions]\npolicy = "all"\n',
    )
    write_model(root / "poisoned", Poisoned(), [4], extra="[batching]\nmax_batch_size = 64\n")
    write_model(root / "busy", Busy(), [4])
    return root


@pytest.fixture(scope="session")
def repo_server(test_repo: Path, frontend: str) -> Iterator[ServerThread]:
    with ServerThread(
        repository=test_repo, default_model="scale", grpc_frontend=frontend
    ) as server:
        assert server.server.grpc_frontend == frontend
        yield server


def _stub(target: str, seed: SimpleNamespace) -> Iterator[object]:
    with grpc.insecure_channel(target) as channel:
        yield seed.grpc.ModelServiceStub(channel)


@pytest.fixture
def demo_stub(demo_server: ServerThread, seed: SimpleNamespace) -> Iterator[object]:
    yield from _stub(demo_server.target, seed)


@pytest.fixture
def repo_stub(repo_server: ServerThread, seed: SimpleNamespace) -> Iterator[object]:
    yield from _stub(repo_server.target, seed)
