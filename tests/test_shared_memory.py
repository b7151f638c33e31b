"""KServe V2 system shared memory (``--allow-client-shm``): a client on the same machine passes
tensors through regions of /dev/shm with tritonclient's own helpers, over gRPC and HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from support import Scale, ServerThread, write_model

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, frontend: str) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("shm-repo")
    write_model(root / "scale", Scale(3.0), [4])
    with ServerThread(
        repository=root,
        http_port="auto",
        allow_client_shm=True,
        model_control="open",
        grpc_frontend=frontend,
    ) as server:
        yield server


@pytest.fixture
def regions(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """An input region holding X and an empty output region, each with its own key."""
    tag = f"{os.getpid()}-{request.node.name[-20:]}".replace("[", "-").replace("]", "")
    given = shm.create_shared_memory_region("in", f"/tw-in-{tag}", X.nbytes)
    taken = shm.create_shared_memory_region("out", f"/tw-out-{tag}", X.nbytes)
    shm.set_shared_memory_region(given, [X])
    yield given, taken
    shm.destroy_shared_memory_region(given)
    shm.destroy_shared_memory_region(taken)


def _clients(server: ServerThread) -> list[tuple[Any, Any]]:
    return [
        (triton_grpc, triton_grpc.InferenceServerClient(server.target)),
        (triton_http, triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")),
    ]


def test_tensors_pass_through_registered_regions_over_grpc_and_http(
    server: ServerThread, regions: tuple[Any, Any]
) -> None:
    given, taken = regions
    for module, client in _clients(server):
        client.register_system_shared_memory("in", given._shm_key, X.nbytes)
        client.register_system_shared_memory("out", taken._shm_key, X.nbytes)
        status = client.get_system_shared_memory_status()
        names = {r["name"] if isinstance(r, dict) else r for r in _names(status)}
        assert names == {"in", "out"}
        x = module.InferInput("x", [2, 4], "FP32")
        x.set_shared_memory("in", X.nbytes)
        output = module.InferRequestedOutput("output")
        output.set_shared_memory("out", X.nbytes)
        client.infer("scale", [x], outputs=[output])
        answer = shm.get_contents_as_numpy(taken, np.float32, [2, 4])
        np.testing.assert_array_equal(answer, X * 3)
        shm.set_shared_memory_region(taken, [np.zeros_like(X)])  # for the next client
        # An inline input beside a shared output, and an inline answer, work as before.
        inline = module.InferInput("x", [2, 4], "FP32")
        inline.set_data_from_numpy(X * 2)
        np.testing.assert_array_equal(client.infer("scale", [inline]).as_numpy("output"), X * 6)
        client.unregister_system_shared_memory()
        assert not _names(client.get_system_shared_memory_status())
        with pytest.raises(InferenceServerException) as gone:
            client.infer("scale", [x])
        assert "no shared memory region 'in' is registered" in gone.value.message()
        client.close()


def _names(status: Any) -> list[Any]:
    """Region names of a status answer (gRPC: a message; HTTP: a list of dicts)."""
    if isinstance(status, list):
        return [entry["name"] for entry in status]
    return list(status.regions)


def test_what_a_region_may_be_is_checked(
    server: ServerThread, regions: tuple[Any, Any], tmp_path: Path
) -> None:
    given, _ = regions
    client = triton_grpc.InferenceServerClient(server.target)

    def refused(name: str, key: str, size: int, offset: int = 0) -> str:
        with pytest.raises(InferenceServerException) as caught:
            client.register_system_shared_memory(name, key, size, offset)
        return f"{caught.value.status()} {caught.value.message()}"

    assert "INVALID_ARGUMENT" in refused("a", "/../etc/passwd", 16)
    assert "INVALID_ARGUMENT" in refused("a", "/tw-no-such-region", 16)
    assert "beyond the 32 bytes" in refused("a", given._shm_key, 32, offset=8)
    other = Path("/dev/shm") / f"tw-other-{os.getpid()}"
    other.write_bytes(b"\0" * 64)
    link = Path("/dev/shm") / f"tw-link-{os.getpid()}"
    link.symlink_to(other)
    try:
        assert "cannot open" in refused("a", "/" + link.name, 16)  # no links followed
        if os.geteuid() == 0:  # root can give the file away: another user's memory
            os.chown(other, 65534, 65534)
            assert "PERMISSION_DENIED" in refused("a", "/" + other.name, 16)
    finally:
        link.unlink()
        other.unlink()
    assert "INVALID_ARGUMENT" in refused("a", given._shm_key + "\n", 16)
    client.register_system_shared_memory("twice", given._shm_key, X.nbytes)
    assert "registered already" in refused("twice", given._shm_key, X.nbytes)
    # A request naming more of a region than it holds.
    x = triton_grpc.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory("twice", X.nbytes, offset=8)
    with pytest.raises(InferenceServerException) as beyond:
        client.infer("scale", [x])
    assert "INVALID_ARGUMENT" in beyond.value.status() and "beyond region" in beyond.value.message()
    client.unregister_system_shared_memory("twice")
    client.close()


def test_shared_memory_is_off_unless_asked(tmp_path: Path, regions: tuple[Any, Any]) -> None:
    given, _ = regions
    write_model(tmp_path / "scale", Scale(3.0), [4])
    with ServerThread(repository=tmp_path, allow_client_shm=True) as server:
        # Registering is a control call: --model-control off (the default) refuses it.
        client = triton_grpc.InferenceServerClient(server.target)
        with pytest.raises(InferenceServerException) as control:
            client.register_system_shared_memory("in", given._shm_key, X.nbytes)
        assert control.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--model-control" in control.value.message()
        client.close()
    with ServerThread(repository=tmp_path, model_control="open") as server:
        client = triton_grpc.InferenceServerClient(server.target)
        with pytest.raises(InferenceServerException) as off:
            client.register_system_shared_memory("in", given._shm_key, X.nbytes)
        assert off.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--allow-client-shm" in off.value.message()
        assert not list(client.get_system_shared_memory_status().regions)
        x = triton_grpc.InferInput("x", [2, 4], "FP32")
        x.set_shared_memory("in", X.nbytes)
        with pytest.raises(InferenceServerException) as named:
            client.infer("scale", [x])
        assert "--allow-client-shm" in named.value.message()
        client.close()


def test_a_region_whose_file_shrinks_is_an_error_not_a_crash(server: ServerThread) -> None:
    key = f"/tw-shrink-{os.getpid()}"
    region = shm.create_shared_memory_region("shrinks", key, X.nbytes)
    shm.set_shared_memory_region(region, [X])
    client = triton_grpc.InferenceServerClient(server.target)
    client.register_system_shared_memory("shrinks", key, X.nbytes)
    os.truncate(Path("/dev/shm") / key.lstrip("/"), 0)  # a mapped file would now SIGBUS
    x = triton_grpc.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory("shrinks", X.nbytes)
    with pytest.raises(InferenceServerException) as shrank:
        client.infer("scale", [x])
    assert "file shrank" in shrank.value.message()
    client.unregister_system_shared_memory("shrinks")
    client.close()
    shm.destroy_shared_memory_region(region)
