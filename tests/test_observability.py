"""What operators see: health (Check and Watch), the memory watchdog, /metrics, reflection, logs."""

from __future__ import annotations

import json
import queue
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from support import CliServer, Scale, ServerThread, health_status, wait_until, write_model
from torchwire.runtime import LoadedModel

GIB = 1024**3


class Watcher:
    """A health Watch stream read in the background; ``next_status`` waits for the next change."""

    def __init__(self, target: str, service: str = "") -> None:
        self._channel = grpc.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self._stream = stub.Watch(health_pb2.HealthCheckRequest(service=service))
        self._seen: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self._stream:
                self._seen.put(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.RpcError:
            self._seen.put("<closed>")

    def next_status(self, timeout: float = 10) -> str:
        return self._seen.get(timeout=timeout)

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        watcher.close()


def test_health_follows_models_and_shutdown(test_repo: Path, watchers: list[Watcher]) -> None:
    server = ServerThread(repository=test_repo, watchdog_interval_s=0).start()
    try:
        target = server.target
        for service in ("", "ModelService", "scale", "poisoned", "busy"):
            assert health_status(target, service) == "SERVING"
        overall, model, twin = Watcher(target), Watcher(target, "poisoned"), Watcher(target, "")
        watchers += [overall, model, twin]
        assert overall.next_status() == model.next_status() == twin.next_status() == "SERVING"
        server.run(server.server.unload_model("poisoned"))
        assert model.next_status() == "NOT_SERVING"
        assert health_status(target, "poisoned") == "NOT_SERVING"
        assert health_status(target, "") == "SERVING"
        with pytest.raises(grpc.RpcError) as unknown:
            health_status(target, "no-such-service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        twin.close()  # one watcher leaving must not silence the others
    finally:
        server.stop()
    assert overall.next_status() == "NOT_SERVING"  # shutdown is announced before the port closes


def test_health_watch_keeps_no_state_for_names_it_does_not_know(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    write_model(tmp_path / "first", Scale(1.0), [2])
    server = ServerThread(repository=tmp_path, watchdog_interval_s=0, watch="off").start()
    try:
        servicer = server.server.health.servicer
        kept = servicer.state_size()
        with grpc.insecure_channel(server.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for i in range(300):
                stream = stub.Watch(health_pb2.HealthCheckRequest(service=f"made-up-{i}"))
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                stream.cancel()
        assert servicer.state_size() == kept
        # A name that comes to be served later is still announced to whoever watches it.
        late = Watcher(server.target, "late")
        watchers.append(late)
        assert late.next_status() == "SERVICE_UNKNOWN"
        write_model(tmp_path / "late", Scale(2.0), [2])
        server.loop.call_soon_threadsafe(server.server.rescan)
        assert late.next_status(timeout=60) == "SERVING"
        assert servicer.state_size() == kept + 1
    finally:
        server.stop()


def test_health_is_not_serving_while_models_load(
    tmp_path: Path, seed: SimpleNamespace, watchers: list[Watcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model(tmp_path / "slow", Scale(1.0), [2])
    loading, release = threading.Event(), threading.Event()
    warm_up = LoadedModel.warm_up

    def held(self: LoadedModel) -> None:  # the model loads only when the test says so
        loading.set()
        assert release.wait(60)
        warm_up(self)

    monkeypatch.setattr(LoadedModel, "warm_up", held)
    server = ServerThread(repository=tmp_path)
    starting = server.begin()
    try:
        assert loading.wait(60)
        target = f"127.0.0.1:{server.server.port}"  # a lone server binds before it loads
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            watcher = Watcher(target)
            watchers.append(watcher)
            assert watcher.next_status() == "NOT_SERVING"  # bound, still loading
            with pytest.raises(grpc.RpcError) as early:
                seed.grpc.ModelServiceStub(channel).Predict(
                    seed.pb2.PredictRequest(inputs=[1, 2]), timeout=10
                )
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in early.value.details()
            release.set()
            assert watcher.next_status(timeout=60) == "SERVING"
        starting.result(timeout=60)
    finally:
        release.set()
        server.stop()


def test_memory_watchdog_trips_and_recovers_with_hysteresis(
    test_repo: Path, watchers: list[Watcher]
) -> None:
    available = psutil.virtual_memory().available
    # A threshold above what the machine has: NOT_SERVING from the first reading on.
    with ServerThread(
        repository=test_repo, watchdog_interval_s=0.1, watchdog_min_available_mb=10**8
    ) as server:
        target = server.target
        watcher = Watcher(target)
        watchers.append(watcher)
        assert watcher.next_status() == "NOT_SERVING"
        assert health_status(target, "ModelService") == "SERVING"  # only "" reflects memory
        watchdog = server.server.watchdog
        # Back above the threshold but inside the margin: still NOT_SERVING (no flapping).
        watchdog.recover_margin_bytes = 1000 * GIB
        watchdog.min_available_bytes = max(0, available - 2 * GIB)
        readings = watchdog.readings
        wait_until(lambda: watchdog.readings >= readings + 5, "five readings")
        assert health_status(target) == "NOT_SERVING"
        # Above threshold plus margin: SERVING within an interval.
        watchdog.recover_margin_bytes = 0
        assert watcher.next_status(timeout=5) == "SERVING"
        # The process's own RSS over its limit trips it again.
        watchdog.min_available_bytes = 0
        watchdog.max_rss_bytes = 1
        assert watcher.next_status(timeout=5) == "NOT_SERVING"
        registry = server.server.metrics.registry
        sample = registry.get_sample_value
        assert sample("torchwire_watchdog_transitions_total", {"state": "not_serving"}) == 2
        assert sample("torchwire_watchdog_transitions_total", {"state": "serving"}) == 1
        assert (sample("torchwire_memory_available_bytes") or 0) > 0


def _scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(families: dict[str, Any], family: str, suffix: str = "") -> dict[tuple, float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in families[family].samples
        if s.name == family + suffix
    }


def test_idle_metrics_connections_hold_a_bounded_number_of_threads_and_are_dropped(
    test_repo: Path,
) -> None:
    import socket

    from torchwire.metrics import METRICS_THREADS

    with ServerThread(repository=test_repo, watchdog_interval_s=0) as server:
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        base = threading.active_count()
        peak = [base]
        done = threading.Event()

        def sample() -> None:  # measures, synchronises nothing
            while not done.wait(0.005):
                peak[0] = max(peak[0], threading.active_count())

        sampler = threading.Thread(target=sample)
        sampler.start()
        idle = [
            socket.create_connection(("127.0.0.1", server.server.metrics_port))
            for _ in range(2 * METRICS_THREADS)
        ]
        try:
            # Queued behind the idle connections, a scrape is answered once they time out.
            with urllib.request.urlopen(url, timeout=60) as response:
                assert b"torchwire_requests_total" in response.read()
            done.set()
            sampler.join()
            # Unbounded, the idle connections alone would add 32 threads. (A few more than
            # METRICS_THREADS: a finishing thread frees its slot just before it ends.)
            assert peak[0] <= base + 1 + METRICS_THREADS + 4  # + the sampler
            for connection in idle:
                connection.settimeout(30)
                assert connection.recv(1) == b""  # closed by the server
        finally:
            done.set()
            for connection in idle:
                connection.close()


def test_metrics_count_every_request_by_outcome(test_repo: Path, seed: SimpleNamespace) -> None:
    with (
        ServerThread(repository=test_repo, default_model="scale") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = seed.grpc.ModelServiceStub(channel)
        for _ in range(5):
            stub.Predict(seed.pb2.PredictRequest(inputs=[1, 2, 3, 4]), timeout=10)
        for bad in ({"inputs": [1.0]}, {"inputs": [1, 2, 3, 4], "metadata": {"model": "x"}}):
            for _ in range(2):
                with pytest.raises(grpc.RpcError):
                    stub.Predict(seed.pb2.PredictRequest(**bad), timeout=10)
        slow = seed.pb2.PredictRequest(inputs=[300, 0, 0, 0], metadata={"model": "busy"})
        for _ in range(3):
            stub.Predict(slow, timeout=30)
        stream = [seed.pb2.PredictRequest(inputs=[1, 1, 1, 1, 2, 2, 2, 2])] * 4
        assert len(list(stub.PredictStream(iter(stream), timeout=10))) == 4
        assert server.server.metrics_port
        families = _scrape(server.server.metrics_port)

    requests = _samples(families, "torchwire_requests", "_total")
    key = lambda model, version, api, code: tuple(  # noqa: E731
        sorted({"model": model, "version": version, "api": api, "code": code}.items())
    )
    assert requests == {
        key("scale", "2", "seed", "OK"): 5,
        key("scale", "2", "seed", "INVALID_ARGUMENT"): 2,
        key("", "", "seed", "NOT_FOUND"): 2,
        key("busy", "1", "seed", "OK"): 3,
        key("scale", "2", "seed_stream", "OK"): 4,
    }
    durations = _samples(families, "torchwire_request_duration_seconds", "_count")
    assert durations[(("api", "seed"), ("model", "scale"))] == 7  # the bad-length ones too
    assert durations[(("api", "seed"), ("model", "busy"))] == 3
    # The busy model computes for about 0.1 s: its requests are timed around the awaited work.
    buckets = _samples(families, "torchwire_request_duration_seconds", "_bucket")
    assert buckets[(("api", "seed"), ("le", "0.05"), ("model", "busy"))] == 0
    assert buckets[(("api", "seed"), ("le", "+Inf"), ("model", "busy"))] == 3
    compute = _samples(families, "torchwire_compute_duration_seconds", "_count")
    assert compute[(("model", "busy"),)] == 3
    assert _samples(families, "torchwire_batch_size", "_sum")[(("model", "scale"),)] == 5 + 8
    assert (
        _samples(families, "torchwire_queue_duration_seconds", "_count")[(("model", "scale"),)] == 9
    )
    assert all(v == 0 for v in _samples(families, "torchwire_inflight_requests").values())
    loads = _samples(families, "torchwire_model_loads", "_total")
    assert loads[(("model", "scale"), ("outcome", "ok"))] == 2
    assert _samples(families, "torchwire_model_version")[(("model", "scale"),)] == 2
    assert "process_resident_memory_bytes" in families


def test_reflection_lists_every_service(demo_server: ServerThread) -> None:
    with grpc.insecure_channel(demo_server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "ModelService",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        service = DescriptorPool(database).FindServiceByName("ModelService")
        methods = {
            m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods
        }
    assert methods["Predict"] == ("torchwire.seed.PredictRequest", "torchwire.seed.PredictResponse")
    assert "PredictStream" in methods


def test_json_access_log_lines_carry_every_field(
    test_repo: Path, seed: SimpleNamespace, tmp_path: Path
) -> None:
    server = CliServer(
        "--repository", str(test_repo), "--default-model", "scale", "--port", "0",
        "--log-format", "json", "--access-log", "true", "--grpc-io-threads", "3",
    )  # fmt: skip
    try:
        target = server.wait_ready()
        with grpc.insecure_channel(target) as channel:
            stub = seed.grpc.ModelServiceStub(channel)
            request = seed.pb2.PredictRequest(inputs=[1, 2, 3, 4, 5, 6, 7, 8])
            stub.Predict(request, metadata=[("x-request-id", "abc-123")], timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Predict(seed.pb2.PredictRequest(inputs=[1]), timeout=10)
            stub.Predict(request, metadata=[("x-request-id", "r" * 1000)], timeout=10)
        assert server.stop() == 0
    finally:
        server.close()
    entries = [json.loads(line) for line in server.lines]  # every line is JSON
    access = [e for e in entries if e["logger"] == "torchwire.access"]
    assert len(access) == 3
    ok, bad, long = access
    assert ok["request_id"] == "abc-123" and ok["code"] == "OK"
    assert (ok["api"], ok["model"], ok["version"], ok["items"]) == ("seed", "scale", "2", 2)
    assert ok["peer"].startswith("ipv4:127.0.0.1:") and ok["duration_ms"] > 0
    assert bad["code"] == "INVALID_ARGUMENT" and len(bad["request_id"]) == 16
    assert long["request_id"] == "r" * 128  # a client's id is cut, not logged whole
    banner = next(e for e in entries if "torchwire serving on" in e["message"])
    assert "metrics: http://" in banner["message"]
    assert "native, pygrpc-native" in banner["message"] and "3 I/O threads" in banner["message"]
