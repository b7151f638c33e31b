"""Stopping loses nothing: a call that reaches the server before it stops is served, and one
that comes later is refused UNAVAILABLE (which clients retry), never CANCELLED.

gRPC's core kills, when a server stops, every call it accepted but the Python server had not yet
asked for; their callers got CANCELLED, which no client retries. The first test makes such calls
on purpose: it holds the event loop, so that calls pile up in the core (channelz counts them),
then stops the server and releases the loop."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from support import Scale, ServerThread, wait_until, write_model
from torchwire._proto import modelservice_messages_pb2 as pb
from torchwire.compat import grpc_aio
from torchwire.server.rpc import drain

CALLS = 8


def _channelz_servers() -> dict[str, dict[str, str]]:
    """gRPC core's servers in this process (channelz), by id: their call counters."""
    servers = json.loads(grpc_aio.channelz_servers()).get("server", [])
    return {server["ref"]["serverId"]: server["data"] for server in servers}


@pytest.mark.parametrize("tokens", [False, True], ids=["open", "with-tokens"])
def test_calls_waiting_in_grpc_when_the_server_stops_are_served_not_cancelled(
    tmp_path: Path, tokens: bool
) -> None:
    write_model(tmp_path / "repo" / "scale", Scale(2.0), [2])
    settings: dict[str, object] = {"repository": tmp_path / "repo", "grpc_frontend": "aio"}
    metadata = None
    if tokens:  # the calls taken while stopping go through the token check too
        (tmp_path / "tokens").write_text("alpha\n")
        settings["auth_token_file"] = tmp_path / "tokens"
        metadata = [("authorization", "Bearer alpha")]
    others = set(_channelz_servers())
    server = ServerThread(**settings).start()
    (ours,) = set(_channelz_servers()) - others

    def calls_started() -> int:
        return int(_channelz_servers()[ours].get("callsStarted", 0))

    request = pb.PredictRequest(
        raw_inputs=np.ones(2, np.float32).tobytes(), metadata={"model": "scale"}
    ).SerializeToString()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    with grpc.insecure_channel(server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        before = calls_started()
        server.loop.call_soon_threadsafe(hold)
        try:
            assert held.wait(30)
            predict = channel.unary_unary("/ModelService/Predict")
            calls = [predict.future(request, timeout=60, metadata=metadata) for _ in range(CALLS)]
            expected = [[2.0, 2.0]] * CALLS
            if tokens:
                calls.append(predict.future(request, timeout=60))  # no token
                expected.append("UNAUTHENTICATED")
            wait_until(lambda: calls_started() - before == len(calls), "the calls reach gRPC")
            # The stop is queued behind the hold: it starts before the server takes the calls.
            stopped = server.begin_stop(grace_s=10)
        finally:
            release.set()
        outcomes = []
        for call in calls:
            try:
                answer = pb.PredictResponse.FromString(call.result())
                outcomes.append(np.frombuffer(answer.raw_outputs, np.float32).tolist())
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        stopped.result(60)
    server.close()
    assert outcomes == expected


@pytest.mark.parametrize(
    ("model", "answer"), [("scale", "OK"), ("missing", "NOT_FOUND")], ids=["answers", "errors"]
)
def test_closed_loop_callers_see_no_cancelled_call_when_the_server_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, answer: str, frontend: str
) -> None:
    # Callers that send their next call as soon as they have an answer (an error is an answer
    # too), straight to the server (no balancer to take it out of their way), while it stops.
    # The windows are widened so that a caller thread slowed by a busy machine still counts as
    # waiting, not gone.
    monkeypatch.setattr(drain, "QUIET_S", 0.5)
    monkeypatch.setattr(drain, "HOLD_MAX_S", 5.0)
    write_model(tmp_path / "scale", Scale(2.0), [2])
    server = ServerThread(repository=tmp_path, grpc_frontend=frontend).start()
    request = pb.PredictRequest(
        raw_inputs=np.ones(2, np.float32).tobytes(), metadata={"model": model}
    ).SerializeToString()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    warm, done = threading.Event(), threading.Event()

    def caller() -> None:
        with grpc.insecure_channel(server.target) as channel:
            predict = channel.unary_unary("/ModelService/Predict")
            while not done.is_set():
                try:
                    predict(request, timeout=30)
                    outcome = "OK"
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                with lock:
                    outcomes[outcome] += 1
                    if outcomes[answer] >= 200:
                        warm.set()
                if outcome != answer:  # the server is gone
                    return

    callers = [threading.Thread(target=caller, daemon=True) for _ in range(8)]
    for thread in callers:
        thread.start()
    try:
        assert warm.wait(60), outcomes
        server.begin_stop(grace_s=10).result(60)
        for thread in callers:
            thread.join(60)
    finally:
        done.set()
    server.close()
    assert set(outcomes) == {answer, "UNAVAILABLE"}, outcomes
    assert outcomes["UNAVAILABLE"] == len(callers)


def test_a_grpc_whose_accept_loop_differs_serves_and_stops_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A grpcio whose private accept loop is not the one drain.py mirrors (1.85 changed it):
    # nothing is wrapped or taken, calls are served, the stop says what it cannot do.
    monkeypatch.setattr(grpc_aio, "known", lambda: False)
    write_model(tmp_path / "scale", Scale(2.0), [2])
    server = ServerThread(repository=tmp_path, grpc_frontend="aio").start()
    request = pb.PredictRequest(
        raw_inputs=np.ones(2, np.float32).tobytes(), metadata={"model": "scale"}
    ).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        answer = pb.PredictResponse.FromString(
            channel.unary_unary("/ModelService/Predict")(request)
        )
    assert np.frombuffer(answer.raw_outputs, np.float32).tolist() == [2.0, 2.0]
    server.stop()
    assert "will be answered CANCELLED" in caplog.text


class _SlowCopy(nn.Module):
    """Burns CPU for x[0, 0] rounds, then answers a copy of its (large) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounds = int(x[0, 0].item())
        y = torch.ones(128, 128)
        for _ in range(rounds):
            y = torch.tanh(y @ y) * 0.5
        return x + y[0, 0] * 0.0


def test_answers_being_written_when_the_stop_comes_still_reach_their_callers(
    tmp_path: Path,
) -> None:
    # The native front end sends an answer asynchronously: a stop that closed the port as soon
    # as the last answer was handed over lost answers still being written (8 MB each here).
    items = 2_000_000
    write_model(tmp_path / "copy", _SlowCopy(), [items])
    server = ServerThread(repository=tmp_path, grpc_frontend="native").start()
    batcher = server.server.repository.get("copy")  # type: ignore[union-attr]
    data = np.zeros(items, np.float32)
    data[0] = 300  # rounds of model time, so that the stop starts while it computes
    request = pb.PredictRequest(raw_inputs=data.tobytes()).SerializeToString()
    size = ("grpc.max_receive_message_length", 64 << 20)
    with grpc.insecure_channel(server.target, options=[size]) as channel:
        predict = channel.unary_unary("/ModelService/Predict")
        calls = [predict.future(request, timeout=60) for _ in range(4)]
        registry = server.server.metrics.registry

        def inflight() -> float:
            labels = {"model": "copy"}
            return registry.get_sample_value("torchwire_inflight_requests", labels) or 0.0

        wait_until(lambda: inflight() == 4 and batcher.computing == 1, "all 4 taken, 1 computes")
        stopped = server.begin_stop(grace_s=30)
        answers = [pb.PredictResponse.FromString(call.result()) for call in calls]
        assert stopped.result(60)
    server.close()
    for answer in answers:
        assert np.frombuffer(answer.raw_outputs, np.float32)[0] == 300
