"""What clients can hold on a server: idle connections are closed, connections are capped; what
the native front end cannot bound runs on grpc.aio."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from support import ServerThread, connection


def predict(channel: grpc.Channel, seed: SimpleNamespace, **kwargs: object) -> list[float]:
    stub = seed.grpc.ModelServiceStub(channel)
    request = seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata={"model": "scale"})
    return list(stub.Predict(request, timeout=30, **kwargs).outputs)


def test_an_idle_connection_is_closed_and_the_client_reconnects_on_its_next_call(
    test_repo: Path, seed: SimpleNamespace
) -> None:
    with ServerThread(repository=test_repo, connection_idle_s=0.5) as server:
        channel = connection(server.target)
        assert predict(channel, seed) == [3.0, 6.0, 9.0, 12.0]
        closed = threading.Event()

        def changed(state: grpc.ChannelConnectivity) -> None:
            if state != grpc.ChannelConnectivity.READY:
                closed.set()

        channel.subscribe(changed)
        # The client's own idle timer is 30 minutes: this is the server closing it.
        assert closed.wait(30), "the idle connection was never closed"
        channel.unsubscribe(changed)
        assert predict(channel, seed) == [3.0, 6.0, 9.0, 12.0]
        channel.close()


def test_connections_beyond_the_cap_are_refused_and_a_freed_slot_serves_again(
    test_repo: Path, seed: SimpleNamespace
) -> None:
    with ServerThread(repository=test_repo, max_connections=3, connection_idle_s=0) as server:
        held = [connection(server.target) for _ in range(3)]
        for channel in held:
            assert predict(channel, seed) == [3.0, 6.0, 9.0, 12.0]
        extra = connection(server.target)
        with pytest.raises(grpc.RpcError) as refused:
            predict(extra, seed)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for channel in held[:2]:  # the held connections keep working
            assert predict(channel, seed) == [3.0, 6.0, 9.0, 12.0]
        held.pop().close()
        assert predict(extra, seed, wait_for_ready=True) == [3.0, 6.0, 9.0, 12.0]
        for channel in [*held, extra]:
            channel.close()


def test_a_connection_past_its_age_is_closed_gracefully_so_clients_reconnect(
    test_repo: Path, seed: SimpleNamespace
) -> None:
    settings = {"connection_idle_s": 0, "max_connection_age_s": 0.5, "grace_period_s": 5}
    with ServerThread(repository=test_repo, **settings) as server:
        channel = connection(server.target)
        stub = seed.grpc.ModelServiceStub(channel)
        closed = threading.Event()

        def changed(state: grpc.ChannelConnectivity) -> None:
            if state != grpc.ChannelConnectivity.READY:
                closed.set()

        assert predict(channel, seed) == [3.0, 6.0, 9.0, 12.0]
        # A call that spans the connection's age is let finish (the grace period) ...
        slow = stub.Predict.future(
            seed.pb2.PredictRequest(inputs=[3000, 1, 0, 0], metadata={"model": "busy"}),
            timeout=60,
        )
        channel.subscribe(changed)
        assert closed.wait(30), "the connection was never closed at its age"
        assert list(slow.result().outputs) == [3001.0]
        channel.unsubscribe(changed)
        # ... and the next call goes over a new connection.
        assert predict(channel, seed) == [3.0, 6.0, 9.0, 12.0]
        channel.close()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"max_connections": 3}, "--max-connections"),
        ({"max_connection_age_s": 60.0}, "--max-connection-age-s"),
        ({"connection_idle_s": 30.0}, "--connection-idle-s"),
        ({"tempdir": "/nonexistent/torchwire"}, "no directory for its fallback socket"),
    ],
    ids=["max-connections", "connection-age", "connection-idle", "no-tmpdir"],
)
def test_what_the_native_front_end_cannot_serve_runs_on_grpc_aio_and_says_why(
    test_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, Any],
    reason: str,
) -> None:
    if "tempdir" in settings:
        monkeypatch.setattr(tempfile, "tempdir", settings.pop("tempdir"))
    with ServerThread(repository=test_repo, **settings) as server:
        assert server.server.grpc_frontend == "aio"
        assert reason in server.server.grpc_frontend_why
        assert f"gRPC front end: aio, not native: {server.server.grpc_frontend_why}" in caplog.text
        with grpc.insecure_channel(server.target) as channel:
            answer = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"")
        assert answer == b"\x08\x01"  # live: true
