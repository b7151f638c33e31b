"""`torchwire serve --workers 2 --engine on`: two workers speak the protocols, one engine process
holds each model once and batches the requests of both.

Each test starts the real command and talks to it over separate connections (the kernel spreads
connections over the workers; the access log says which worker answered).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from support import (
    CliServer,
    DeviceFault,
    Scale,
    connection,
    metric_samples,
    wait_until,
    write_model,
    write_words_model,
)
from support import seed_predict as predict
from torchwire.config import ServerSettings, load_model_config
from torchwire.fleet.arena import Arena
from torchwire.fleet.engine import engine_config
from torchwire.fleet.plan import engine_devices

ANSWERED = r"\[worker (\d+)\] torchwire\.access: .*code=OK.*request_id={request_id}"
ENGINE_PID = re.compile(r"engine of cpu: pid (\d+)")

GATED_CONFIG = """\
format = "python"
[[inputs]]
name = "x"
dtype = "FP32"
shape = [2]
[[outputs]]
name = "y"
dtype = "FP32"
shape = [2]
[instances]
count = 1  # one inference thread, which the holder blocks: the others queue behind it
[batching]
max_batch_size = 64
inline_max_ms = 0  # the holder blocks an inference thread, not the thread reading requests
"""
GATED_MODEL = """\
class Model:
    def predict(self, inputs):
        x = inputs["x"]
        if float(x[0, 0]) < 0:  # the request that holds the model until the test opens the gate
            with open({gate!r}) as gate:
                gate.read()
        return {{"y": x * 2}}
"""


def serve(cli_servers: list[CliServer], *args: str) -> CliServer:
    server = CliServer(
        "--port", "0", "--workers", "2", "--engine", "on", "--access-log", "true", *args
    )
    cli_servers.append(server)
    return server


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for found, v in metric_samples(url, name) if labels.items() <= found.items())


def test_two_workers_share_one_engine_that_holds_each_model_once(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    write_model(tmp_path / "scale", Scale(2.0), [4])
    server = serve(cli_servers, "--repository", str(tmp_path), "--http-port", "auto")
    target = server.wait_ready()
    assert "scale v[1] on cpu in the engine of cpu" in server.output
    assert len(re.findall(r"\[engine cpu\] .*loaded scale version 1", server.output)) == 1
    assert not re.search(r"\[worker \d\] .*loaded scale", server.output)

    for i in range(40):  # each on a new connection: the kernel picks the worker
        assert predict(target, seed, [i, 1, 2, 3], f"r{i}") == [2.0 * i, 2.0, 4.0, 6.0]
    answered = server.wait_for(ANSWERED.format(request_id=r"r\d+"), count=40)
    assert {match.group(1) for match in answered} == {"0", "1"}, "one worker answered everything"

    # Triton's clients, unchanged, over both protocols.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    grpc_client = triton.InferenceServerClient(target)
    tensor = triton.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    assert np.array_equal(grpc_client.infer("scale", [tensor]).as_numpy("output"), x * 2)
    # A CPU model with no [instances] count runs one inference thread per worker in the engine.
    config = grpc_client.get_model_config("scale").config
    assert [group.count for group in config.instance_group] == [2]
    http_port = re.search(r"127\.0\.0\.1:(\d+) \(HTTP\)", server.output)
    assert http_port is not None
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{http_port.group(1)}")
    tensor = triton_http.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    assert np.array_equal(http_client.infer("scale", [tensor]).as_numpy("output"), x * 2)

    url = server.metrics_url()
    assert metric(url, "torchwire_requests_total", model="scale") == 42
    assert metric(url, "torchwire_engine_crossing_seconds_count", engine="cpu") == 42
    assert metric(url, "torchwire_engine_batch_size_count", engine="cpu") >= 1
    assert metric(url, "torchwire_engine_batch_size_sum", engine="cpu") == 40 + 2 + 2
    assert metric(url, "torchwire_engine_requests", engine="cpu") == 0

    # A stream reads ahead: its requests are in the engine together, answered in order.
    with connection(target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        requests = [
            seed.pb2.PredictRequest(inputs=[i, 0, 0, 1], metadata={"model": "scale"})
            for i in range(50)
        ]
        answers = [list(a.outputs) for a in stub.PredictStream(iter(requests), timeout=30)]
    assert answers == [[2.0 * i, 0.0, 0.0, 2.0] for i in range(50)]
    assert server.stop() == 0


def gated_model(tmp_path: Path, extra: str = "") -> Path:
    """``repo/gated``, whose call on a negative first value waits until the gate (a FIFO) is
    written; return the gate."""
    model = tmp_path / "repo" / "gated"
    (model / "1").mkdir(parents=True)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    (model / "config.toml").write_text(GATED_CONFIG + extra)
    (model / "1" / "model.py").write_text(GATED_MODEL.format(gate=str(gate)))
    return gate


def hold_the_engine(
    pool: ThreadPoolExecutor, target: str, seed: SimpleNamespace, url: str, queued: int
) -> tuple[Future[list[float]], list[Future[list[float]]]]:
    """Send the holder (it blocks the gated model's one inference thread until the gate
    opens), then ``queued`` requests ``[i, i]``; return their calls once all are in the engine."""
    holder = pool.submit(predict, target, seed, [-1, 0], "holder", "gated")
    wait_until(lambda: metric(url, "torchwire_engine_requests") == 1, "the holder computes")
    calls = [pool.submit(predict, target, seed, [i, i], f"q{i}", "gated") for i in range(queued)]
    wait_until(
        lambda: metric(url, "torchwire_engine_requests") == queued + 1,
        f"{queued} queued behind it",
    )
    return holder, calls


def test_a_full_engine_queue_refuses_with_resource_exhausted_and_a_time_to_retry(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    gate = gated_model(tmp_path, "max_queue = 4\n")
    server = serve(cli_servers, "--repository", str(tmp_path / "repo"))
    target = server.wait_ready()
    url = server.metrics_url()
    with ThreadPoolExecutor(6) as pool:
        holder, queued = hold_the_engine(pool, target, seed, url, 4)
        with pytest.raises(grpc.RpcError) as refused:
            predict(target, seed, [9, 9], "refused", "gated")
        with open(gate, "w") as opening:
            opening.write("go")
        assert holder.result(timeout=30) == [-2.0, 0.0]
        assert [call.result(timeout=30) for call in queued] == [[2.0 * i] * 2 for i in range(4)]
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full (4 of 4 items waiting" in str(refused.value.details())
    trailing = dict(refused.value.trailing_metadata() or ())
    assert int(trailing["torchwire-retry-after-ms"]) >= 1
    rejected = metric(url, "torchwire_rejected_requests_total", model="gated", reason="queue_full")
    assert rejected == 1
    assert server.stop() == 0


def test_requests_from_both_workers_are_batched_together_in_the_engine(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    gate = gated_model(tmp_path)
    server = serve(cli_servers, "--repository", str(tmp_path / "repo"))
    target = server.wait_ready()
    url = server.metrics_url()

    with ThreadPoolExecutor(17) as pool:
        holder, calls = hold_the_engine(pool, target, seed, url, 16)
        with open(gate, "w") as opening:
            opening.write("go")
        assert holder.result(timeout=30) == [-2.0, 0.0]
        assert [call.result(timeout=30) for call in calls] == [[2.0 * i] * 2 for i in range(16)]
    answered = server.wait_for(ANSWERED.format(request_id=r"q\d+"), count=16)
    assert {match.group(1) for match in answered} == {"0", "1"}, "one worker sent them all"
    # Two model calls: the holder alone, then the 16 of both workers in one batch.
    assert metric(url, "torchwire_engine_batch_size_count", engine="cpu") == 2
    assert metric(url, "torchwire_engine_batch_size_bucket", engine="cpu", le="8.0") == 1
    assert metric(url, "torchwire_engine_batch_size_bucket", engine="cpu", le="16.0") == 2
    assert server.stop() == 0


def test_a_killed_engine_answers_unavailable_until_its_successor_serves_then_all_is_normal(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    write_model(tmp_path / "scale", Scale(2.0), [2])
    server = serve(cli_servers, "--repository", str(tmp_path))
    target = server.wait_ready()
    match = ENGINE_PID.search(server.output)
    assert match is not None
    codes: list[grpc.StatusCode] = []
    wrong: list[tuple[float, list[float]]] = []
    stop = threading.Event()

    def load(thread: int) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            value = float(thread * 100_000 + i)
            try:
                answer = predict(target, seed, [value, 1.0], f"l{thread}-{i}")
            except grpc.RpcError as exc:
                codes.append(exc.code())
                continue
            codes.append(grpc.StatusCode.OK)
            if answer != [2 * value, 2.0]:
                wrong.append((value, answer))

    # One connection's worker, watched: NOT_SERVING while its engine is away.
    statuses: list[str] = []
    watch_channel = connection(target)
    watch = HealthStub(watch_channel).Watch(HealthCheckRequest(service=""), timeout=120)

    def watch_health() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for change in watch:
                statuses.append(HealthCheckResponse.ServingStatus.Name(change.status))

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(codes) >= 50, "calls answered before the kill")
        os.kill(int(match.group(1)), signal.SIGKILL)
        server.wait_for(r"engine of cpu \(pid \d+\) killed by SIGKILL; .* starting it again")
        # Its successor is killed as soon as it serves: while the workers reconnect to it.
        successor = server.wait_for(r"engine of cpu \(pid (\d+)\) serving", count=2)[1]
        os.kill(int(successor.group(1)), signal.SIGKILL)
        server.wait_for(r"engine of cpu \(pid \d+\) killed by SIGKILL; .* starting it", count=2)
        server.wait_for(r"engine of cpu \(pid \d+\) serving", count=3)
        ok = [grpc.StatusCode.OK] * 20
        wait_until(lambda: codes[-20:] == ok, "20 calls in a row answered after the restarts", 60)
        wait_until(lambda: statuses[-1:] == ["SERVING"] and len(statuses) >= 3, "health back")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        watch.cancel()
        watcher.join()
        watch_channel.close()
    assert statuses[0] == "SERVING" and "NOT_SERVING" in statuses, statuses
    assert not wrong
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert re.search(r"reconnected to the engine of cpu \(pid \d+\): it holds 1 of", server.output)
    assert metric(server.metrics_url(), "torchwire_worker_restarts_total", worker="engine-cpu") == 2
    assert server.stop() == 0


def test_a_killed_worker_loses_only_its_own_calls_the_other_serves_from_the_engine(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    write_model(tmp_path / "scale", Scale(2.0), [2])
    server = serve(cli_servers, "--repository", str(tmp_path))
    target = server.wait_ready()
    worker = re.search(r"workers 0: pid (\d+)", server.output)
    assert worker is not None
    os.kill(int(worker.group(1)), signal.SIGKILL)
    server.wait_for(r"worker 0 \(pid \d+\) killed by SIGKILL")
    # Meanwhile worker 1 answers every new connection, from the engine.
    for i in range(10):
        assert predict(target, seed, [i, 1], f"w{i}") == [2.0 * i, 2.0]
    server.wait_for(r"worker 0 \(pid \d+\) serving", count=2)
    for i in range(20):
        assert predict(target, seed, [i, 1], f"after{i}") == [2.0 * i, 2.0]
    # The model stayed loaded in the engine: the restarted worker found it held.
    assert len(re.findall(r"\[engine cpu\] .*loaded scale version 1", server.output)) == 1
    assert server.stop() == 0


def test_a_model_key_overrides_the_flag_and_a_reload_swaps_in_the_engine(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    write_model(tmp_path / "scale", Scale(2.0), [2])
    write_model(tmp_path / "local", Scale(3.0), [2], extra='[instances]\nengine = "off"\n')
    server = serve(cli_servers, "--repository", str(tmp_path), "--watch", "off")
    target = server.wait_ready()
    assert len(re.findall(r"\[worker \d\] .*loaded local version 1", server.output)) == 2
    assert not re.search(r"\[engine cpu\] .*loaded local", server.output)
    assert predict(target, seed, [1, 2], "local", model="local") == [3.0, 6.0]

    staged = tmp_path / "scale" / "1" / "model.pt.tmp"
    torch.jit.script(Scale(5.0)).save(str(staged))
    staged.rename(tmp_path / "scale" / "1" / "model.pt")
    server.process.send_signal(signal.SIGHUP)  # every worker rescans now
    server.wait_for(r"\[worker \d\] .*scale version 1: swapped in the new file", count=2)
    server.wait_for(r"\[engine cpu\] .*scale:1: no worker holds it")  # the old one, once
    assert len(re.findall(r"\[engine cpu\] .*loaded scale version 1", server.output)) == 2
    assert {tuple(predict(target, seed, [1, 2], f"new{i}")) for i in range(16)} == {(5.0, 10.0)}
    assert server.stop() == 0


def test_a_failed_device_restarts_the_engine_with_exit_code_4_and_the_workers_serve_on(
    cli_servers: list[CliServer], seed: SimpleNamespace, tmp_path: Path
) -> None:
    write_model(tmp_path / "fault", DeviceFault(), [2])
    server = serve(cli_servers, "--repository", str(tmp_path))
    target = server.wait_ready()
    with pytest.raises(grpc.RpcError) as caught:
        predict(target, seed, [-3, 2], "poison", model="fault")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "device-side assert triggered" in str(caught.value.details())
    server.wait_for(r"engine of cpu \(pid \d+\) exited with code 4 \(a model's device failed\)")
    server.wait_for(r"reconnected to the engine of cpu .* holds 1 of this", count=2)
    for i in range(20):  # each on a new connection: either worker, from the new engine
        assert predict(target, seed, [i, 1], f"after{i}", model="fault") == [i + 1.0]
    assert server.stop() == 0


def test_client_shared_memory_crosses_to_the_engine_of_a_lone_worker(
    cli_servers: list[CliServer], tmp_path: Path
) -> None:
    write_model(tmp_path / "scale", Scale(3.0), [4])
    server = CliServer(
        "--port", "0", "--engine", "on", "--allow-client-shm", "true", "--model-control",
        "open", "--repository", str(tmp_path),
    )  # fmt: skip
    cli_servers.append(server)
    target = server.wait_ready()
    assert "with 1 workers" in server.output and "in the engine of cpu" in server.output
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tag = f"{os.getpid()}-engine"
    given = shm.create_shared_memory_region("in", f"/tw-in-{tag}", x.nbytes)
    taken = shm.create_shared_memory_region("out", f"/tw-out-{tag}", x.nbytes)
    try:
        shm.set_shared_memory_region(given, [x])
        client = triton.InferenceServerClient(target)
        client.register_system_shared_memory("in", given._shm_key, x.nbytes)
        client.register_system_shared_memory("out", taken._shm_key, x.nbytes)
        tensor = triton.InferInput("x", [2, 4], "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        output = triton.InferRequestedOutput("output")
        output.set_shared_memory("out", x.nbytes)
        client.infer("scale", [tensor], outputs=[output])
        np.testing.assert_array_equal(shm.get_contents_as_numpy(taken, np.float32, [2, 4]), x * 3)
        client.unregister_system_shared_memory()
        client.close()
    finally:
        shm.destroy_shared_memory_region(given)
        shm.destroy_shared_memory_region(taken)
    assert server.stop() == 0


def test_bytes_tensors_cross_inline_and_python_steps_run_in_the_engine(
    cli_servers: list[CliServer], tmp_path: Path
) -> None:
    write_words_model(tmp_path / "words")
    server = serve(cli_servers, "--repository", str(tmp_path))
    target = server.wait_ready()
    assert "words v[1] on cpu in the engine of cpu" in server.output
    client = triton.InferenceServerClient(target)
    words = np.array([[b"engine"], [b"\x00\xffraw"], [b""]], dtype=object)
    tensor = triton.InferInput("text", [3, 1], "BYTES")
    tensor.set_data_from_numpy(words)
    answer = client.infer("words", [tensor])
    assert answer.as_numpy("length").ravel().tolist() == [6, 5, 0]
    assert answer.as_numpy("loud").ravel().tolist() == [b"!!!!!!", b"!!!!!", b""]
    client.close()
    assert server.stop() == 0


def test_engines_are_planned_from_the_configs(tmp_path: Path) -> None:
    write_model(tmp_path / "cpu", Scale(2.0), [2])
    write_model(tmp_path / "gpu", Scale(2.0), [2], extra='[instances]\ndevice = "cuda"\n')
    write_model(tmp_path / "pinned", Scale(2.0), [2], extra='[instances]\nengine = "on"\n')

    def plan(**flags: object) -> list[str]:
        return engine_devices(ServerSettings(repository=tmp_path, **flags))  # type: ignore[arg-type]

    assert plan(workers=2) == ["cpu", "cuda:0"]  # auto: the GPU model; the pinned CPU one
    assert plan(workers=1) == ["cpu"]  # one process: a GPU model needs none, unless asked
    assert plan(workers=2, engine="off") == ["cpu"]  # the model's key wins
    assert plan(workers=2, engine="on") == ["cpu", "cuda:0"]
    (tmp_path / "pinned" / "config.toml").unlink()
    assert plan(workers=1) == []
    assert engine_devices(ServerSettings(engine="on")) == ["cpu"]  # the demo's models


def test_a_cpu_engine_gives_a_model_one_inference_thread_per_worker_unless_its_config_says(
    tmp_path: Path,
) -> None:
    write_model(tmp_path / "unset", Scale(2.0), [2])
    write_model(tmp_path / "one", Scale(2.0), [2], extra="[instances]\ncount = 1\n")
    write_model(tmp_path / "gpu", Scale(2.0), [2], extra='[instances]\ndevice = "cuda"\n')
    configs = {n: load_model_config(tmp_path / n / "config.toml") for n in ("unset", "one", "gpu")}

    def count(name: str, device: str, workers: int) -> int:
        return engine_config(configs[name], device, workers).instances.count

    assert count("unset", "cpu", 4) == 4  # the parallelism four whole-server workers had
    assert count("unset", "cpu", 1) == 1
    assert count("one", "cpu", 4) == 1  # the config's own count wins
    assert count("gpu", "cuda:0", 4) == 1  # a GPU runs one instance's batches at a time


def test_the_arena_ring_reuses_freed_slots_in_order_and_says_when_full() -> None:
    arena = Arena.create(1024)
    try:
        a, b, c = arena.allocate(300), arena.allocate(300), arena.allocate(300)
        assert (a, b, c) == (0, 320, 640)
        assert arena.allocate(200) is None  # 960 + 256 > 1024, and slot 0 is still taken
        arena.free(b)  # out of order: held until the slot before it is freed
        assert arena.allocate(200) is None
        arena.free(a)  # now 0..640 are free: the ring wraps
        assert arena.allocate(500) == 0
        assert arena.allocate(200) is None  # between 512 and 640 only 128 are free
        data = np.arange(10, dtype=np.float32)
        arena.write(data, 0)
        assert np.array_equal(arena.view(data.dtype, (10,), 0), data)
        arena.free(c)
        arena.free(0)
        assert arena.in_use() == 0
        assert arena.allocate(1024) == 0  # empty: from the start again
        assert arena.allocate(2048) is None
    finally:
        arena.close()


@pytest.mark.parametrize("dtype", ["FP32", "INT64"])
def test_inputs_and_answers_cross_through_the_arena_without_mixing(
    cli_servers: list[CliServer], tmp_path: Path, dtype: str
) -> None:
    write_model(tmp_path / "scale", Scale(2.0), [3], dtype=dtype)
    server = serve(cli_servers, "--repository", str(tmp_path))
    target = server.wait_ready()
    numpy = np.float32 if dtype == "FP32" else np.int64

    def call(i: int) -> None:
        client = triton.InferenceServerClient(target)
        x = np.full((1 + i % 5, 3), i, dtype=numpy)
        tensor = triton.InferInput("x", list(x.shape), dtype)
        tensor.set_data_from_numpy(x)
        answer = client.infer("scale", [tensor]).as_numpy("output")
        assert np.array_equal(answer, x * 2), (i, answer)
        client.close()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(200)))
    assert server.stop() == 0
