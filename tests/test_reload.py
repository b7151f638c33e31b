"""Hot reload: new files swap in under load, no request fails; bad files change nothing."""

from __future__ import annotations

import concurrent.futures
import gc
import io
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from test_cli import CliServer
from torch import nn

from support import Busy, Scale, ServerThread, health_status, write_model
from torchwire import Client, TorchwireError
from torchwire.repository.repository import ServedModel
from torchwire.runtime import LoadedModel
from torchwire.server.common.observe import Call
from torchwire.server.plane import inference

FAST_WATCH = {"watch_interval_s": 0.1, "watch_settle_s": 0.3}


class Shift(nn.Module):
    """Busy's row sums plus a constant: a second version whose answers differ from Busy's."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.busy = Busy()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.busy(x) + self.offset


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model always fails")


class Narrow(nn.Module):
    """Answers one float per item where the serving model answers four: a wrong shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


def scripted_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def replace_atomically(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status_or_none(target: str, service: str) -> str | None:
    """The health status of ``service``, or None while the server does not know it."""
    try:
        return health_status(target, service)
    except grpc.RpcError:
        return None


def loads(server: ServerThread, model: str, outcome: str) -> float:
    registry = server.server.metrics.registry
    labels = {"model": model, "outcome": outcome}
    return registry.get_sample_value("torchwire_model_loads_total", labels) or 0.0


class Load:
    """Clients calling a model in a loop from threads until stopped; every outcome is kept.

    Half the clients use the seed API (a client generated from the founding proto), half KServe
    V2 (torchwire's client with protocol="v2").
    """

    def __init__(self, target: str, seed: SimpleNamespace, clients: int, model: str) -> None:
        self._channel = grpc.insecure_channel(target)
        stub = seed.grpc.ModelServiceStub(self._channel)
        request = seed.pb2.PredictRequest(inputs=[1, 1, 1, 1], metadata={"model": model})
        self._v2 = Client(target, protocol="v2", timeout=30)
        ones = np.ones((1, 4), np.float32)
        self._calls: list[Callable[[], tuple[float, ...]]] = [
            lambda: tuple(stub.Predict(request, timeout=30).outputs),
            lambda: tuple(float(v) for v in self._v2.predict(model, ones).ravel()),
        ]
        self._stop = threading.Event()
        self.answers: list[list[tuple[float, ...]]] = [[] for _ in range(clients)]
        self.errors: list[Exception] = []
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        call = self._calls[index % 2]
        while not self._stop.is_set():
            try:
                self.answers[index].append(call())
            except (grpc.RpcError, TorchwireError) as error:
                self.errors.append(error)

    def latest(self) -> set[tuple[float, ...]]:
        return {answers[-1] for answers in self.answers if answers}

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._channel.close()
        self._v2.close()


@pytest.fixture
def load_runs() -> Iterator[list[Load]]:
    runs: list[Load] = []
    yield runs
    for run in runs:
        run.stop()


def test_five_file_replacements_under_load_fail_no_request(
    tmp_path: Path, seed: SimpleNamespace, load_runs: list[Load]
) -> None:
    path = write_model(tmp_path / "m", Scale(2.0), [4]) / "1" / "model.pt"
    with ServerThread(repository=tmp_path, **FAST_WATCH) as server:
        old_model = weakref.ref(server.server.repository.get("m").model)  # type: ignore[union-attr]
        load = Load(server.target, seed, clients=8, model="m")
        load_runs.append(load)
        wait_for(lambda: load.latest() == {(2.0,) * 4}, "the first answers")

        # 1. a good file, renamed into place
        replace_atomically(path, scripted_bytes(Scale(3.0)))
        wait_for(lambda: load.latest() == {(3.0,) * 4}, "the swap to x3")
        # 2. a truncated file, 3. random bytes: both fail validation, x3 keeps serving
        good = scripted_bytes(Scale(5.0))
        path.write_bytes(good[: len(good) // 2])
        wait_for(lambda: loads(server, "m", "failed") == 1, "the truncated file to fail")
        path.write_bytes(os.urandom(len(good)))
        wait_for(lambda: loads(server, "m", "failed") == 2, "the random bytes to fail")
        assert load.latest() == {(3.0,) * 4}
        # 4. a good file written slowly in chunks: loaded once, when complete
        with path.open("wb") as file:
            for start in range(0, len(good), len(good) // 4 + 1):
                file.write(good[start : start + len(good) // 4 + 1])
                file.flush()
                time.sleep(0.1)
        wait_for(lambda: load.latest() == {(5.0,) * 4}, "the swap to x5")
        # 5. another good file, written in place in one go
        path.write_bytes(scripted_bytes(Scale(7.0)))
        wait_for(lambda: load.latest() == {(7.0,) * 4}, "the swap to x7")
        load.stop()

        assert load.errors == []
        for answers in load.answers:  # every client saw the versions in order, never back
            firsts = [a[0] for a in answers]
            assert firsts == sorted(firsts) and set(firsts) <= {2.0, 3.0, 5.0, 7.0}
        assert loads(server, "m", "ok") == 1 + 3 and loads(server, "m", "failed") == 2
        assert health_status(server.target, "m") == "SERVING"
        server.run(server.server.repository.drained())  # type: ignore[union-attr]
        gc.collect()
        assert old_model() is None  # the first version's model was released


def test_bad_files_of_every_kind_leave_the_serving_version(
    tmp_path: Path, seed: SimpleNamespace
) -> None:
    path = write_model(tmp_path / "m", Scale(2.0), [4]) / "1" / "model.pt"
    with ServerThread(repository=tmp_path, **FAST_WATCH) as server:
        channel = grpc.insecure_channel(server.target)
        stub = seed.grpc.ModelServiceStub(channel)
        request = seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata={"model": "m"})
        for failures, bad in enumerate([scripted_bytes(Broken()), scripted_bytes(Narrow())], 1):
            replace_atomically(path, bad)
            wait_for(lambda n=failures: loads(server, "m", "failed") == n, f"bad file {failures}")
            assert list(stub.Predict(request, timeout=10).outputs) == [2, 4, 6, 8]
        # A broken config.toml is reported and changes nothing either.
        # (Written atomically: an empty file seen half-way would be a second, different error.)
        replace_atomically(tmp_path / "m" / "config.toml", b"[[inputs]\n")
        wait_for(lambda: loads(server, "m", "failed") == 3, "the bad config")
        assert list(stub.Predict(request, timeout=10).outputs) == [2, 4, 6, 8]
        channel.close()


def test_a_file_replaced_while_the_models_load_is_picked_up(
    tmp_path: Path, seed: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watcher once took its first look at the files after the load: a file replaced while
    # the models loaded (a deploy racing a start) was never served. The test holds the load.
    path = write_model(tmp_path / "m", Scale(2.0), [4]) / "1" / "model.pt"
    loading, release = threading.Event(), threading.Event()
    warm_up = LoadedModel.warm_up

    def held(self: LoadedModel) -> None:
        if not loading.is_set():  # only the first load waits for the test
            loading.set()
            assert release.wait(60)
        warm_up(self)

    monkeypatch.setattr(LoadedModel, "warm_up", held)
    server = ServerThread(repository=tmp_path, **FAST_WATCH)
    starting = server.begin()
    try:
        assert loading.wait(60)  # Scale(2.0) is read; now the file changes under it
        replace_atomically(path, scripted_bytes(Scale(3.0)))
        release.set()
        starting.result(timeout=60)
        with grpc.insecure_channel(server.target) as channel:
            stub = seed.grpc.ModelServiceStub(channel)
            request = seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata={"model": "m"})
            wait_for(
                lambda: list(stub.Predict(request, timeout=10).outputs) == [3, 6, 9, 12],
                "the replaced file served",
            )
    finally:
        release.set()
        server.stop()


def test_a_new_version_becomes_the_default_and_the_old_one_drains(
    tmp_path: Path, seed: SimpleNamespace
) -> None:
    model_dir = write_model(tmp_path / "v", Busy(), [4])
    with ServerThread(repository=tmp_path, **FAST_WATCH) as server:
        channel = grpc.insecure_channel(server.target)
        stub = seed.grpc.ModelServiceStub(channel)

        def ask(first: float, **metadata: str) -> Any:
            request = seed.pb2.PredictRequest(inputs=[first, 1, 0, 0], metadata=metadata)
            return stub.Predict.future(request, timeout=30)

        slow_on_v1 = ask(3000, model="v", version="1")  # computes for about a second
        first = server.server.repository.get("v", "1")  # type: ignore[union-attr]
        wait_for(lambda: first.computing == 1, "the slow call to compute on version 1")
        (model_dir / "2").mkdir()
        replace_atomically(model_dir / "2" / "model.pt", scripted_bytes(Shift(1000.0)))
        wait_for(lambda: ask(0, model="v").result().outputs[0] == 1001.0, "version 2")
        assert list(slow_on_v1.result().outputs) == [3001.0]  # finished on version 1
        with pytest.raises(grpc.RpcError) as gone:
            ask(0, model="v", version="1").result()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert "versions: [2]" in gone.value.details()
        channel.close()


def test_removed_versions_and_models_are_unloaded_after_draining(
    tmp_path: Path, seed: SimpleNamespace
) -> None:
    versions = {1: Scale(1.0), 2: Scale(2.0)}
    write_model(tmp_path / "a", Scale(1.0), [4], versions, extra='[versions]\npolicy = "all"\n')
    write_model(tmp_path / "b", Scale(5.0), [4])
    with ServerThread(repository=tmp_path, **FAST_WATCH) as server:
        channel = grpc.insecure_channel(server.target)
        stub = seed.grpc.ModelServiceStub(channel)

        def ask(**metadata: str) -> list[float]:
            request = seed.pb2.PredictRequest(inputs=[1, 1, 1, 1], metadata=metadata)
            return list(stub.Predict(request, timeout=10).outputs)

        assert ask(model="a", version="1") == [1.0] * 4
        shutil.rmtree(tmp_path / "a" / "1")
        wait_for(lambda: 1 not in server.server.repository.models["a"].versions, "v1 gone")  # type: ignore[union-attr]
        assert ask(model="a") == [2.0] * 4
        shutil.rmtree(tmp_path / "a")
        wait_for(lambda: health_status(server.target, "a") == "NOT_SERVING", "model a gone")
        with pytest.raises(grpc.RpcError) as gone:
            ask(model="a")
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert ask(model="b") == [5.0] * 4  # the others keep serving
        # A model directory that appears is served.
        write_model(tmp_path / "c", Scale(9.0), [4])
        wait_for(lambda: status_or_none(server.target, "c") == "SERVING", "model c")
        assert ask(model="c") == [9.0] * 4
        channel.close()


def test_a_deleted_model_file_keeps_serving_and_sighup_rescans(
    tmp_path: Path, seed: SimpleNamespace
) -> None:
    path = tmp_path / "one.pt"
    path.write_bytes(scripted_bytes(Scale(2.0)))
    server = CliServer("--model", str(path), "--input-shape", "4", "--port", "0", "--watch", "off")
    try:
        target = server.wait_ready()
        channel = grpc.insecure_channel(target)
        stub = seed.grpc.ModelServiceStub(channel)

        def ask() -> list[float]:
            return list(stub.Predict(seed.pb2.PredictRequest(inputs=[1, 1, 1, 1])).outputs)

        path.unlink()  # deleting the file of a --model server keeps what it serves
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "cannot read model 'one'" in server.output, "the rescan to notice")
        assert ask() == [2.0] * 4
        replace_atomically(path, scripted_bytes(Scale(4.0)))
        assert ask() == [2.0] * 4  # watching is off: nothing happens until asked
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: ask() == [4.0] * 4, "SIGHUP to load the new file")
        channel.close()
        assert server.stop() == 0
    finally:
        server.close()


def _retired_after_found(server: ServerThread, model_dir: Path) -> None:
    """Version 2 of ``model_dir`` (three times its input) is written and served: version 1 is
    retired (closed) while a request that found it waits to be queued."""
    first = server.server.repository.get(model_dir.name, "1")  # type: ignore[union-attr]
    (model_dir / "2").mkdir()
    replace_atomically(model_dir / "2" / "model.pt", scripted_bytes(Scale(3.0)))
    wait_for(lambda: not first.available, "version 1 to be retired")


@pytest.mark.parametrize("held_at", ["admission", "decoding"])
@pytest.mark.parametrize("api", ["seed", "v2"])
def test_a_request_that_found_a_version_retired_before_it_was_queued_goes_to_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str, held_at: str
) -> None:
    # The native front end finds a request's version on its own thread, then admits, decodes
    # and queues it: a reload on the event loop can retire the version in between. The first
    # request is held there (once its version is known, or in the decoder) until the reload is
    # done, so the race is certain, not rare.
    model_dir = write_model(tmp_path / "m", Scale(2.0), [4])
    holding, reloaded = threading.Event(), threading.Event()
    owner, name = (
        (Call, "target")
        if held_at == "admission"
        else (inference, "decode_request" if api == "seed" else "decode_infer")
    )
    step = getattr(owner, name)

    def held(*args: Any) -> Any:
        if not holding.is_set() and threading.current_thread().name == "torchwire-native":
            holding.set()
            assert reloaded.wait(30)
        return step(*args)

    monkeypatch.setattr(owner, name, held)
    with ServerThread(repository=tmp_path, grpc_frontend="native", **FAST_WATCH) as server:
        with Client(server.target, protocol=api, timeout=30, retries=0) as client:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                asked = pool.submit(client.predict, "m", np.ones((1, 4), np.float32))
                assert holding.wait(30)
                _retired_after_found(server, model_dir)
                reloaded.set()
                np.testing.assert_array_equal(asked.result(), np.full((1, 4), 3.0))  # version 2
            np.testing.assert_array_equal(client.predict("m", np.ones((1, 4), np.float32)), 3.0)
        inflight = server.server.metrics.registry.get_sample_value(
            "torchwire_inflight_requests", {"model": "m"}
        )
        assert inflight == 0  # counted once, where it was answered


def test_an_http_request_whose_version_is_retired_while_its_body_arrives_goes_to_the_new_one(
    tmp_path: Path,
) -> None:
    # REST finds the version (and admits the call) before it reads the body: a slow upload
    # spans a reload. The body's second half is sent once version 1 is retired.
    model_dir = write_model(tmp_path / "m", Scale(2.0), [4])
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    ).encode()
    with ServerThread(repository=tmp_path, http_port="auto", **FAST_WATCH) as server:
        registry = server.server.metrics.registry

        def inflight() -> float:
            labels = {"model": "m"}
            return registry.get_sample_value("torchwire_inflight_requests", labels) or 0.0

        with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=30) as sock:
            sock.sendall(
                b"POST /v2/models/m/infer HTTP/1.1\r\nHost: torchwire\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
            wait_for(lambda: inflight() == 1, "the request to find version 1")
            _retired_after_found(server, model_dir)
            sock.sendall(body[10:])
            answer = sock.makefile("rb").read().decode()  # to the end: the server closes
        status, _, payload = answer.partition("\r\n\r\n")
        assert status.startswith("HTTP/1.1 200"), answer
        assert json.loads(payload)["outputs"][0]["data"] == [3.0] * 4  # version 2
        assert inflight() == 0


def test_the_default_version_is_found_whole_while_another_thread_swaps_versions() -> None:
    # The native front end finds versions on its own thread while the event loop swaps them in
    # (add the new, pop the old, as ModelRepository._sync does). Finding the highest version
    # and then looking it up could land between the two and find it gone.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows at once
    served = ServedModel("m", {1: "version 1"})
    stop, failures, found = threading.Event(), [], 0

    def find() -> None:
        nonlocal found
        while not stop.is_set():
            try:
                assert served.default().startswith("version")
                found += 1
            except Exception as exc:
                failures.append(exc)

    finder = threading.Thread(target=find)
    finder.start()
    try:
        version = 1
        while version < 200_000 and not failures:
            served.versions[version + 1] = f"version {version + 1}"
            served.versions.pop(version)
            version += 1
    finally:
        stop.set()
        finder.join()
        sys.setswitchinterval(switch)
    assert found and not failures, failures[:3]
