"""PredictStream answers every request, in order, as soon as it is done."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from support import ServerThread, in_process
from torchwire.metrics import Metrics
from torchwire.server.common.observe import Call, Observer
from torchwire.server.rpc.read_ahead import read_ahead


def test_200_requests_on_one_stream_come_back_in_order_and_correct(
    demo_stub: Any, seed: SimpleNamespace, demo_repo: Path
) -> None:
    rng = np.random.default_rng(10)
    sizes = rng.integers(1, 4, size=200)
    inputs = [rng.standard_normal((int(n), 256), dtype=np.float32) for n in sizes]
    requests = (seed.pb2.PredictRequest(inputs=x.ravel().tolist()) for x in inputs)
    answers = [np.array(r.outputs) for r in demo_stub.PredictStream(requests, timeout=60)]
    reference = in_process(demo_repo / "recsys" / "1" / "model.pt")
    assert len(answers) == 200
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(answer, reference(x).ravel(), rtol=1e-5, atol=1e-6)


class _OpenStream:
    """Requests sent one by one while the stream stays open, as a live client would."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def send(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[Any]:
        while (request := self._queue.get()) is not None:
            yield request


def test_three_requests_get_three_answers_without_sending_more(
    repo_stub: Any, seed: SimpleNamespace
) -> None:
    stream = _OpenStream()
    responses = repo_stub.PredictStream(iter(stream), timeout=30)
    for i in range(3):
        stream.send(seed.pb2.PredictRequest(inputs=[i, 0, 0, 1]))
    # The stream stays open and nothing more is sent: the three answers must still come.
    answers = [list(next(responses).outputs) for _ in range(3)]
    assert answers == [[3 * i, 0, 0, 3] for i in range(3)]
    stream.close()
    assert list(responses) == []


def test_a_stream_is_pipelined_into_shared_batches(test_repo: Path, seed: SimpleNamespace) -> None:
    with ServerThread(repository=test_repo) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = seed.grpc.ModelServiceStub(channel)
            # The first request keeps the model busy for a while; the 20 after it are read and
            # queued meanwhile, and so must leave together instead of one by one.
            requests = [seed.pb2.PredictRequest(inputs=[300, 0, 0, 0], metadata={"model": "busy"})]
            requests += [
                seed.pb2.PredictRequest(inputs=[0, i, 0, 0], metadata={"model": "busy"})
                for i in range(20)
            ]
            answers = [list(r.outputs) for r in stub.PredictStream(iter(requests), timeout=60)]
        registry = server.server.metrics.registry
        items = registry.get_sample_value("torchwire_batch_size_sum", {"model": "busy"})
        calls = registry.get_sample_value("torchwire_batch_size_count", {"model": "busy"})
    assert answers == [[300.0]] + [[float(i)] for i in range(20)]
    # One request per model call would give 21 calls of 1 item (plus none for the warm-up).
    assert items == 21 and calls is not None and calls < 21


def test_a_bad_request_ends_the_stream_after_the_answers_before_it(
    repo_stub: Any, seed: SimpleNamespace
) -> None:
    requests = [seed.pb2.PredictRequest(inputs=[i, 1, 1, 1]) for i in range(5)]
    requests.insert(3, seed.pb2.PredictRequest(inputs=[1, 2, 3]))  # 3 floats, not 4
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in repo_stub.PredictStream(iter(requests), timeout=30):
            received.append(list(response.outputs))
    assert received == [[3 * i, 3, 3, 3] for i in range(3)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request 3 of the stream: expected a multiple of 4")


def test_a_model_failure_ends_the_stream_naming_the_request(
    repo_stub: Any, seed: SimpleNamespace
) -> None:
    def request(first: float) -> Any:
        return seed.pb2.PredictRequest(inputs=[first, 1, 1, 1], metadata={"model": "poisoned"})

    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in repo_stub.PredictStream(iter([request(1), request(666), request(2)])):
            received.append(list(response.outputs))
    assert received == [[4.0]]
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details().startswith("request 1 of the stream: model raised")


def test_a_client_that_walks_away_mid_stream_leaves_the_server_serving(
    repo_stub: Any, seed: SimpleNamespace
) -> None:
    stream = _OpenStream()
    responses = repo_stub.PredictStream(iter(stream), timeout=30)
    stream.send(seed.pb2.PredictRequest(inputs=[1, 1, 1, 1]))
    assert list(next(responses).outputs) == [3, 3, 3, 3]
    responses.cancel()
    stream.close()
    answer = repo_stub.Predict(seed.pb2.PredictRequest(inputs=[1, 0, 0, 0]), timeout=10)
    assert list(answer.outputs) == [3, 0, 0, 0]


def test_unary_calls_and_a_stream_sharing_a_model_each_get_their_own_rows(
    demo_server: ServerThread, seed: SimpleNamespace, demo_repo: Path
) -> None:
    # On the native front end the unary calls are answered from the thread that computed them
    # and the stream's through the event loop: one batch can hold both kinds.
    import concurrent.futures

    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1, 256), dtype=np.float32) for _ in range(240)]
    reference = in_process(demo_repo / "recsys" / "1" / "model.pt")
    with grpc.insecure_channel(demo_server.target) as channel:
        stub = seed.grpc.ModelServiceStub(channel)

        def unary(x: np.ndarray) -> np.ndarray:
            request = seed.pb2.PredictRequest(inputs=x.ravel().tolist())
            return np.array(stub.Predict(request, timeout=30).outputs)

        def stream(chunk: list[np.ndarray]) -> list[np.ndarray]:
            requests = (seed.pb2.PredictRequest(inputs=x.ravel().tolist()) for x in chunk)
            return [np.array(r.outputs) for r in stub.PredictStream(requests, timeout=60)]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streamed = pool.submit(stream, inputs[:120])
            answers = list(pool.map(unary, inputs[120:]))
            answers = streamed.result() + answers
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(answer, reference(x).ravel(), rtol=1e-5, atol=1e-6)


class _Answered:
    """An inference whose answer is ready at once: the read-ahead alone is under test."""

    def __init__(self, value: int) -> None:
        self.value = value

    def submit(self) -> Any:
        answer = asyncio.get_running_loop().create_future()
        answer.set_result([np.array([self.value])])
        return answer


def test_a_request_stream_that_breaks_ends_the_read_ahead_counting_no_request_never_read() -> None:
    observer = Observer(Metrics(process_metrics=False))
    opened: list[Call] = []

    def open_call() -> Call:
        opened.append(Call(observer, "v2_stream", lambda: ("peer", "")))
        return opened[-1]

    async def requests() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ConnectionResetError("the client's connection broke")

    async def scenario() -> list[tuple[int, int | None, bool, str | None]]:
        seen = []
        begin = lambda request, _call: _Answered(request)  # noqa: E731
        async with read_ahead(requests(), open_call, begin, stop_at_error=False) as entries:
            async for entry in entries:
                if entry.call is not None:
                    entry.call.finish()
                error = type(entry.error).__name__ if entry.error is not None else None
                seen.append((entry.index, entry.request, entry.broken, error))
        return seen

    seen = asyncio.run(scenario())
    assert seen == [
        (0, 1, False, None),
        (1, 2, False, None),
        (2, None, True, "ConnectionResetError"),
    ]
    assert len(opened) == 2  # two requests read, two counted: the break is not a request
