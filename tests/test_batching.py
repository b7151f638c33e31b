"""Dynamic batching: batches form under load, never for a lone caller, and never mix answers up."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import torchwire
from support import Busy, Held, Scale, ServerThread, in_process, wait_until, write_model
from torchwire import Client
from torchwire.config import BatchingConfig, ModelConfig, TensorSpec
from torchwire.runtime import Batcher, LoadedModel, batcher
from torchwire.runtime.cost import DEFAULT_TORCH_THREADS


def _batch_stats(server: ServerThread, model: str) -> tuple[float, float]:
    """(items computed, model calls) so far, from the torchwire_batch_size histogram."""
    registry = server.server.metrics.registry
    items = registry.get_sample_value("torchwire_batch_size_sum", {"model": model}) or 0.0
    calls = registry.get_sample_value("torchwire_batch_size_count", {"model": model}) or 0.0
    return items, calls


def test_64_callers_with_mixed_sizes_each_get_their_own_rows(
    demo_server: ServerThread,
    seed: SimpleNamespace,
    demo_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The event loop counts as busy, as it is under a sustained load: recsys is cheap enough to
    # run on an idle loop, one request per loop turn (tests/test_call_cost.py), and a burst of
    # 64 calls can be over before the loop's load is first measured (every 20 ms).
    monkeypatch.setattr(batcher, "LOOP_BUSY", -1.0)
    rng = np.random.default_rng(30)
    inputs = [rng.standard_normal((int(n), 256), dtype=np.float32) for n in rng.integers(1, 8, 64)]
    items_before, calls_before = _batch_stats(demo_server, "recsys")
    with grpc.insecure_channel(demo_server.target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        calls = [stub.Predict.future(seed.pb2.PredictRequest(inputs=x.ravel())) for x in inputs]
        answers = [np.array(call.result(timeout=30).outputs) for call in calls]
    reference = in_process(demo_repo / "recsys" / "1" / "model.pt")
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(answer, reference(x).ravel(), rtol=1e-5, atol=1e-6)
    items, model_calls = _batch_stats(demo_server, "recsys")
    assert items - items_before == sum(len(x) for x in inputs)
    assert model_calls - calls_before < 64  # some requests shared a model call


def test_a_lone_caller_runs_alone_and_at_once(test_repo: Path, seed: SimpleNamespace) -> None:
    with (
        ServerThread(repository=test_repo, default_model="scale") as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        stub = seed.grpc.ModelServiceStub(ch)
        for i in range(20):
            started = time.monotonic()
            answer = stub.Predict(seed.pb2.PredictRequest(inputs=[i, 0, 0, 1]), timeout=10)
            assert time.monotonic() - started < 1.0  # liveness: nobody waited for a count to fill
            assert list(answer.outputs) == [3 * i, 0, 0, 3]
        assert _batch_stats(server, "scale") == (20, 20)  # every batch held exactly one request


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A busy model with a queue of at most 3 items."""
    write_model(
        tmp_path / "busy", Busy(), [4], extra="[batching]\nmax_batch_size = 8\nmax_queue = 3\n"
    )
    with ServerThread(repository=tmp_path) as server:
        yield server


def _busy(server: ServerThread) -> Batcher:
    return server.server.repository.get("busy")


def _occupy(server: ServerThread, stub: Any, seed: SimpleNamespace, rounds: int = 3000) -> Any:
    """Start a call that keeps the model busy for about a second; return its future once the
    model computes it (the next requests queue behind it)."""
    future = stub.Predict.future(seed.pb2.PredictRequest(inputs=[rounds, 0, 0, 0]), timeout=30)
    wait_until(lambda: _busy(server).computing == 1, "the busy request computes")
    return future


def test_expired_and_cancelled_requests_are_never_computed(
    slow_server: ServerThread, seed: SimpleNamespace
) -> None:
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        busy = _occupy(slow_server, stub, seed)
        expiring = stub.Predict.future(seed.pb2.PredictRequest(inputs=[0, 1, 0, 0]), timeout=0.2)
        cancelled = stub.Predict.future(seed.pb2.PredictRequest(inputs=[0, 2, 0, 0]), timeout=30)
        kept = stub.Predict.future(seed.pb2.PredictRequest(inputs=[0, 3, 0, 0]), timeout=30)
        wait_until(lambda: _busy(slow_server).queued_items == 3, "three requests queued")
        cancelled.cancel()
        with pytest.raises(grpc.RpcError) as expired:
            expiring.result()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert list(kept.result().outputs) == [3.0]
        assert list(busy.result().outputs) == [3000.0]
    # The model saw the busy request and the kept one: 2 items, neither of the other two.
    assert _batch_stats(slow_server, "busy")[0] == 2


def test_a_full_queue_answers_resource_exhausted_then_recovers(
    slow_server: ServerThread, seed: SimpleNamespace
) -> None:
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        busy = _occupy(slow_server, stub, seed)
        queued = stub.Predict.future(seed.pb2.PredictRequest(inputs=[0] * 12), timeout=30)
        wait_until(lambda: _busy(slow_server).queued_items == 3, "the queue is full")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(seed.pb2.PredictRequest(inputs=[0, 1, 0, 0]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Refused at admission, before the request was decoded.
        assert "queue full (3 of 3 items waiting)" in refused.value.details()
        # When to come back, as trailing metadata, and the refusal counted.
        trailers = dict(refused.value.trailing_metadata() or ())
        hint = trailers["torchwire-retry-after-ms"]
        if slow_server.server.grpc_frontend == "aio":  # the native front cannot send grpc-*
            assert trailers["grpc-retry-pushback-ms"] == hint  # gRPC's retry policy reads it
        assert f"retry in about {hint} ms" in refused.value.details()
        assert int(hint) >= 1
        registry = slow_server.server.metrics.registry
        labels = {"model": "busy", "reason": "queue_full"}
        assert registry.get_sample_value("torchwire_rejected_requests_total", labels) >= 1
        assert busy.result().outputs and queued.result().outputs
        answer = stub.Predict(seed.pb2.PredictRequest(inputs=[0, 5, 0, 0]), timeout=30)
        assert list(answer.outputs) == [5.0]


def test_a_request_larger_than_the_whole_queue_is_invalid_not_retry_later(
    slow_server: ServerThread, seed: SimpleNamespace
) -> None:
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(seed.pb2.PredictRequest(inputs=[0] * 16), timeout=30)  # 4 items > 3
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the request has 4 items, more than its queue holds (max_queue = 3)" in (
        refused.value.details()
    )


def test_instances_share_the_load_and_batches_still_form(
    tmp_path: Path, seed: SimpleNamespace
) -> None:
    write_model(
        tmp_path / "busy",
        Busy(),
        [4],
        extra="[batching]\nmax_batch_size = 16\nmax_delay_ms = 50\n[instances]\ncount = 2\n",
    )
    before = set(threading.enumerate())
    with ServerThread(repository=tmp_path) as server, grpc.insecure_channel(server.target) as ch:
        inference_threads = [t for t in set(threading.enumerate()) - before if "busy:1" in t.name]
        assert len(inference_threads) == 2  # one per instance
        stub = seed.grpc.ModelServiceStub(ch)
        requests = [seed.pb2.PredictRequest(inputs=[100, i, 0, 0]) for i in range(40)]
        futures = [stub.Predict.future(r, timeout=60) for r in requests]
        assert [list(f.result().outputs) for f in futures] == [[100.0 + i] for i in range(40)]
        items, calls = _batch_stats(server, "busy")
    assert items == 40 and calls < 40
    assert not any(t.is_alive() for t in inference_threads)  # stopping the server ended them


@pytest.mark.skipif(DEFAULT_TORCH_THREADS < 2, reason="one core: every model gets one thread")
def test_a_model_without_a_threads_setting_weighs_every_core_after_another_model_set_one(
    tmp_path: Path, seed: SimpleNamespace
) -> None:
    # `light` sets one intra-op thread in its inference thread; `other` is loaded afterwards (in
    # a worker thread, which then reads torch's thread count as 1) and must still be timed with
    # every core before its threads are chosen.
    write_model(tmp_path / "light", Scale(2.0), [4], extra="[instances]\nthreads = 1\n")
    with ServerThread(repository=tmp_path, default_model="light") as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = seed.grpc.ModelServiceStub(channel)
            assert list(stub.Predict(seed.pb2.PredictRequest(inputs=[1, 2, 3, 4])).outputs) == [
                2, 4, 6, 8
            ]  # fmt: skip
            write_model(tmp_path / "other", Scale(3.0), [4])
            server.run(server.server.repository.load_model("other"))
            answer = stub.Predict(
                seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata={"model": "other"})
            )
            assert list(answer.outputs) == [3, 6, 9, 12]
        repository = server.server.repository
        assert repository.get("light").intra_op_threads == 1
        assert sorted(repository.get("other").cost.batch_s) == [1, DEFAULT_TORCH_THREADS]
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert int(fresh.stdout) == DEFAULT_TORCH_THREADS  # torch's own default, not a thread's


SPLIT = [(10.0, 1), (20.0, 2), (30.0, 2)]  # (first value, items) of three requests


def test_batches_padded_to_set_sizes_reach_the_model_at_those_sizes_only() -> None:
    model = Held()
    config = ModelConfig(
        inputs=[TensorSpec(name="x", dtype="FP32", shape=(2,))],
        batching=BatchingConfig(max_batch_size=16, pad_to=[4, 8]),
    )
    loaded = LoadedModel(model, config, Path("sizes"), torch.device("cpu"))
    loaded.warm_up()  # at the first size too
    padded = Batcher(loaded, "m", 1)

    def rows(first: float, count: int) -> np.ndarray:
        return np.arange(first, first + 2 * count, dtype=np.float32).reshape(count, 2)

    async def scenario() -> list[Any]:
        padded.start(asyncio.get_running_loop())
        holder = padded.submit([np.full((1, 2), -1.0, np.float32)], 1)  # 1 item: padded to 4
        await asyncio.to_thread(model.entered.wait, 30)
        queued = [padded.submit([rows(first, n)], n) for first, n in SPLIT]  # 5 items: to 8
        model.release.set()
        answers = await asyncio.gather(holder, *queued)
        answers.append(await padded.submit([rows(50, 4)], 4))  # just 4: as it is
        answers.append(await padded.submit([rows(100, 12)], 12))  # more than 8: as it is
        await padded.close(10)
        return answers

    holder, *answers = asyncio.run(scenario())
    assert model.calls == [4, 4, 8, 4, 12]
    assert holder[0].tolist() == [[-2.0, -2.0]]
    for (first, n), answer in zip([*SPLIT, (50, 4), (100, 12)], answers, strict=True):
        assert answer[0].tolist() == (rows(first, n) * 2).tolist()  # its own rows, no padding
    for wrong in ([8, 4], [4, 4], [0, 4], [32]):
        with pytest.raises(
            ValueError, match=r"pad_to\n.*sizes must ascend, from 1 to max_batch_size \(16\)"
        ):
            BatchingConfig(max_batch_size=16, pad_to=wrong)


def test_a_call_the_queued_work_would_outlast_is_refused_before_it_is_decoded(
    slow_server: ServerThread, seed: SimpleNamespace
) -> None:
    batcher = _busy(slow_server)
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)
        busy = _occupy(slow_server, stub, seed)
        queued = stub.Predict.future(seed.pb2.PredictRequest(inputs=[0] * 4), timeout=30)
        wait_until(lambda: batcher.queued_items == 1, "a request waits")
        # As if each item had cost 10 s so far: the one queued item outlasts a 5 s deadline.
        batcher.stats.compute_ns, batcher.stats.inference_count = 10 * 10**9, 1
        with pytest.raises(grpc.RpcError) as refused:
            # Not even a valid request: admission refuses it before anything is decoded.
            stub.Predict(seed.pb2.PredictRequest(inputs=[1, 2, 3]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than the" in refused.value.details()
        assert "ms left before the deadline" in refused.value.details()
        trailers = dict(refused.value.trailing_metadata() or ())
        assert int(trailers["torchwire-retry-after-ms"]) >= 9000
        registry = slow_server.server.metrics.registry
        labels = {"model": "busy", "reason": "deadline"}
        assert registry.get_sample_value("torchwire_rejected_requests_total", labels) == 1
        # Without a deadline there is nothing to outlast: the bad request is decoded, refused.
        with pytest.raises(grpc.RpcError) as invalid:
            stub.Predict(seed.pb2.PredictRequest(inputs=[1, 2, 3]))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(busy.result().outputs) == [3000.0]
        assert list(queued.result().outputs) == [0.0]


def test_a_bug_in_the_batcher_answers_internal_with_an_error_id_not_its_text(
    repo_server: ServerThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    batcher = repo_server.server.repository.get("scale", "2")  # type: ignore[union-attr]

    def compute(batch: list[Any]) -> Any:
        raise RuntimeError("secret internals: /etc/shadow")

    monkeypatch.setattr(batcher, "_compute", compute)
    with Client(repo_server.target, retries=0, timeout=10) as client:
        with pytest.raises(torchwire.TorchwireError) as caught:
            client.predict("scale", np.ones((1, 4), np.float32), version="2")
    assert caught.value.code == "INTERNAL"
    message = str(caught.value)
    assert "secret" not in message and "error id" in message, message
    error_id = message.split("error id ")[1].split(":")[0]
    assert f"error id {error_id}" in caplog.text and "secret internals" in caplog.text
