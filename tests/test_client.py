"""torchwire.Client and AsyncClient against real servers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

import torchwire
from support import CliServer, ServerThread, free_port, in_process, wait_until
from torchwire import TLS, AsyncClient, Client
from torchwire._proto import modelservice_messages_pb2 as pb
from torchwire.client._channel import HEDGE_BURST, HEDGE_RATIO, hedge_channels


@pytest.mark.parametrize("raw", [True, False])
def test_sync_round_trips_on_both_demo_models(
    demo_server: ServerThread, demo_repo: Path, raw: bool
) -> None:
    rng = np.random.default_rng(20)
    features = rng.standard_normal((3, 256), dtype=np.float32)
    images = rng.standard_normal((2, 3, 224, 224), dtype=np.float32)
    with Client(demo_server.target, timeout=30, raw=raw) as client:
        scores = client.predict("recsys", features)
        logits = client.predict("resnet18", images)
        single = client.predict("recsys", features[0])
    np.testing.assert_allclose(
        scores, in_process(demo_repo / "recsys/1/model.pt")(features), 1e-5, 1e-6
    )
    np.testing.assert_allclose(
        logits, in_process(demo_repo / "resnet18/1/model.pt")(images), 1e-4, 1e-5
    )
    assert scores.shape == (3, 1) and logits.shape == (2, 1000) and single.shape == (1,)


def test_async_round_trips_and_streams(demo_server: ServerThread, demo_repo: Path) -> None:
    reference = in_process(demo_repo / "recsys/1/model.pt")
    batches = [
        np.random.default_rng(i).standard_normal((i + 1, 256), dtype=np.float32) for i in range(6)
    ]

    async def main() -> tuple[list[np.ndarray], list[np.ndarray], tuple[int, ...]]:
        async with AsyncClient(demo_server.target, timeout=30) as client:
            answers = await asyncio.gather(*(client.predict("recsys", b) for b in batches))
            streamed = [a async for a in client.stream("recsys", batches)]
            shape = await client.item_shape("resnet18")
        return list(answers), streamed, shape

    answers, streamed, shape = asyncio.run(main())
    for batch, answer, via_stream in zip(batches, answers, streamed, strict=True):
        np.testing.assert_allclose(answer, reference(batch), 1e-5, 1e-6)
        np.testing.assert_allclose(answer, via_stream, 1e-5, 1e-6)  # batchmates differ
    assert shape == (3, 224, 224)


def test_sync_stream_and_item_shape(repo_server: ServerThread) -> None:
    with Client(repo_server.target) as client:
        answers = list(client.stream("scale", [np.full((2, 4), i, np.float32) for i in range(5)]))
        assert client.item_shape("scale") == (4,)
    assert [a.tolist() for a in answers] == [[[3.0 * i] * 4] * 2 for i in range(5)]


def test_errors_are_typed_and_carry_the_status(repo_server: ServerThread) -> None:
    with Client(repo_server.target, timeout=10) as client:
        with pytest.raises(torchwire.ModelNotFoundError) as missing:
            client.predict("nope", np.zeros((1, 4)))
        assert missing.value.code == "NOT_FOUND" and "'nope' not found" in str(missing.value)
        with pytest.raises(torchwire.InvalidInputError) as bad:
            client.predict("scale", np.zeros((1, 3)))
        assert bad.value.code == "INVALID_ARGUMENT"
        with pytest.raises(torchwire.ModelExecutionError) as failed:
            client.predict("poisoned", np.full((1, 4), 666.0))
        assert failed.value.code == "INTERNAL"


def test_a_deadline_surfaces_as_deadline_exceeded(repo_server: ServerThread) -> None:
    slow = np.array([[3000, 0, 0, 0]], np.float32)  # about a second of compute
    with Client(repo_server.target) as client:
        with pytest.raises(torchwire.DeadlineExceededError) as caught:
            client.predict("busy", slow, timeout=0.2)
    assert caught.value.code == "DEADLINE_EXCEEDED"


def test_the_pool_spreads_requests_over_its_connections(
    test_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ServerThread(repository=test_repo, access_log=True) as server:
        with (
            caplog.at_level(logging.INFO, logger="torchwire.access"),
            Client(server.target, pool_size=4) as client,
        ):
            for _ in range(8):
                client.predict("scale", np.ones((1, 4)))
    peers = [r.peer for r in caplog.records if r.name == "torchwire.access"]
    assert len(peers) == 8
    assert len(set(peers)) == 4  # four connections, each used twice, in turn
    assert peers[:4] == peers[4:]


def test_a_call_retries_until_a_restarted_server_answers(test_repo: Path) -> None:
    first = ServerThread(repository=test_repo).start()
    port = first.server.port  # the second server binds the port the first one leaves
    with Client(f"127.0.0.1:{port}", timeout=20, retries=4) as client:
        assert client.predict("scale", np.ones((1, 4))).tolist() == [[3.0] * 4]
        first.stop()
        second = ServerThread(repository=test_repo, port=port)
        restart = threading.Timer(0.3, second.start)
        restart.start()  # the call below starts while nothing listens on the port
        try:
            started = time.monotonic()
            answer = client.predict("scale", np.ones((1, 4)))
            assert time.monotonic() - started > 0.2  # it really waited for the restart
        finally:
            restart.join()
            second.stop()
    assert answer.tolist() == [[3.0] * 4]


def _self_signed(tmp_path: Path, name: str = "") -> tuple[Path, Path]:
    key, cert = tmp_path / f"key{name}.pem", tmp_path / f"cert{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_tls_server_and_client(test_repo: Path, tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    with ServerThread(repository=test_repo, tls_cert=cert, tls_key=key) as server:
        with Client(server.target, tls=TLS.from_files(ca=cert), timeout=10) as client:
            assert client.predict("scale", np.ones((1, 4))).tolist() == [[3.0] * 4]
        with Client(server.target, timeout=2, retries=0) as plaintext:
            with pytest.raises(torchwire.UnavailableError):
                plaintext.predict("scale", np.ones((1, 4)))


def test_a_renewed_certificate_takes_effect_without_a_restart(
    test_repo: Path, tmp_path: Path
) -> None:
    import ssl
    import urllib.request

    key, cert = _self_signed(tmp_path)
    new_key, new_cert = _self_signed(tmp_path, "-new")
    with ServerThread(repository=test_repo, tls_cert=cert, tls_key=key, http_port="auto") as server:
        http_port = server.server.http_port

        def https_ok(ca: Path) -> bool:
            context = ssl.create_default_context(cafile=str(ca))
            url = f"https://127.0.0.1:{http_port}/v2/health/live"
            try:
                with urllib.request.urlopen(url, context=context, timeout=10) as response:
                    return bool(response.status == 200)
            except urllib.error.URLError:
                return False

        def grpc_ok(ca: Path) -> bool:
            with Client(server.target, tls=TLS.from_files(ca=ca), timeout=5, retries=0) as c:
                try:
                    return bool(c.predict("scale", np.ones((1, 4))).tolist() == [[3.0] * 4])
                except torchwire.UnavailableError:
                    return False

        assert grpc_ok(cert) and https_ok(cert) and not grpc_ok(new_cert)
        old = tmp_path / "old-cert.pem"
        old.write_bytes(cert.read_bytes())
        # Renewed in place, as cert-manager does: the key, then the certificate (in between,
        # the files do not match: the server keeps the old pair).
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        assert grpc_ok(new_cert) and https_ok(new_cert)
        assert not grpc_ok(old) and not https_ok(old)


def test_the_v2_protocol_round_trips_and_streams(
    demo_server: ServerThread, demo_repo: Path
) -> None:
    features = np.random.default_rng(21).standard_normal((3, 256), dtype=np.float32)
    expected = in_process(demo_repo / "recsys/1/model.pt")(features)
    with Client(demo_server.target, protocol="v2", timeout=30) as client:
        np.testing.assert_allclose(client.predict("recsys", features), expected, 1e-5, 1e-6)
        streamed = list(client.stream("recsys", [features[:1], features[1:]]))
        assert client.item_shape("resnet18") == (3, 224, 224)
        with pytest.raises(torchwire.InvalidInputError) as bad:
            client.predict("recsys", np.zeros((1, 255), np.float32))
        assert "expected shape [N, 256]" in str(bad.value)

    async def main() -> np.ndarray:
        async with AsyncClient(demo_server.target, protocol="v2", timeout=30) as client:
            return await client.predict("recsys", features)

    np.testing.assert_allclose(asyncio.run(main()), expected, 1e-5, 1e-6)
    np.testing.assert_allclose(np.concatenate(streamed), expected, 1e-5, 1e-6)


def test_retries_of_a_full_queue_are_throttled_and_cannot_amplify_an_overload(
    tmp_path: Path,
) -> None:
    """A full queue is retried (after the server's pushback), but under gRPC retry throttling:
    while every attempt is refused, a client stops retrying after a few failures, so refused
    calls do not multiply the load. On grpc.aio: the native front end cannot send gRPC's
    reserved pushback key, and without it the retries come sooner than the queue drains."""
    import concurrent.futures

    from support import Busy, write_model

    write_model(tmp_path / "busy", Busy(), [4], extra="[batching]\nmax_queue = 1\n")
    with ServerThread(repository=tmp_path, watch="off", grpc_frontend="aio") as server:
        batcher = server.server.repository.get("busy")  # type: ignore[union-attr]
        registry = server.server.metrics.registry
        labels = {"model": "busy", "reason": "queue_full"}

        def refusals() -> float:
            return registry.get_sample_value("torchwire_rejected_requests_total", labels) or 0.0

        slow = np.array([[6000, 0, 0, 0]], np.float32)  # seconds of model time each
        with Client(server.target, timeout=60, retries=4) as client:  # 4 channels
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                running = pool.submit(client.predict, "busy", slow)
                deadline = time.monotonic() + 30
                while batcher._computing == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                queued = pool.submit(client.predict, "busy", slow)
                while batcher._queued_items == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                # The queue stays full for seconds: every attempt now is refused.
                for _ in range(8):
                    with pytest.raises(torchwire.QueueFullError):
                        client.predict("busy", np.ones((1, 4), np.float32))
                assert batcher._queued_items == 1  # still full: the refusals were real
                # Each channel has 10 tokens: its first call retries until half are gone (5
                # attempts), its later calls get one attempt each. 4 channels x 5 + 4 x 1 = 24
                # attempts for 8 calls, where 8 x 5 = 40 without throttling.
                assert refusals() == 24
                running.result()
                queued.result()


def test_a_timed_out_wait_for_a_server_leaves_no_thread_polling_the_channel() -> None:
    """``wait_ready`` that times out (the server is still starting) must stop grpc's
    connectivity thread: left subscribed, that thread polls the channel for ever and dies with
    "Channel closed!" once the client is closed (``benchmarks/run.py`` printed that traceback)."""
    before = set(threading.enumerate())
    with Client(f"127.0.0.1:{free_port()}", timeout=5, retries=0) as client:
        with pytest.raises(grpc.FutureTimeoutError):
            client.wait_ready(timeout=0.3)
        pollers = [t for t in threading.enumerate() if t not in before]
        assert pollers, "expected grpc's connectivity thread to have started"
        for poller in pollers:
            poller.join(timeout=10)
            assert not poller.is_alive(), "the channel is still being polled after the wait"


# -- hedging: a second attempt on another server cuts the tail a stalled one makes -------------


@pytest.fixture
def stalled(test_repo: Path) -> Iterator[CliServer]:
    """A server process that answers, until the test stops it (SIGSTOP: a long GC pause, a
    starved container); it is let go on before it is stopped."""
    server = CliServer("--port", "0", "--repository", str(test_repo))
    try:
        yield server
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.close()


def _stall(server: CliServer) -> None:
    """Stop the server, and return once every thread of it has stopped: a thread still running
    when SIGSTOP is sent can answer a call or two first (seen under load)."""
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
        return bool(states) and all(state in ("T", "t") for state in states)

    wait_until(stopped, "every thread of the stalled server to stop")


def test_a_hedged_call_is_answered_by_the_other_server_while_one_is_stalled(
    stalled: CliServer, repo_server: ServerThread
) -> None:
    # Channel 0 goes to the stalled server, channel 1 to the other: the 1st, 3rd, 5th call's
    # first attempt is sent to the stalled one, and its hedge to the other.
    targets = [stalled.wait_ready(), repo_server.target]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with (
        Client(targets, pool_size=2, timeout=1.0, retries=0) as plain,
        Client(targets, pool_size=2, timeout=3, retries=0, hedge_after=0.05) as hedging,
    ):
        plain.wait_ready()
        hedging.wait_ready()
        _stall(stalled)
        answers = [hedging.predict("scale", x) for _ in range(4)]
        with pytest.raises(torchwire.InvalidInputError):  # the other's answer ends the call
            hedging.predict("scale", np.zeros((1, 3), np.float32))
        with pytest.raises(torchwire.DeadlineExceededError):
            plain.predict("scale", x)  # without a hedge: until its deadline
    for answer in answers:
        assert answer.tolist() == (x * 3).tolist()
    assert hedging.hedged >= 3 and plain.hedged == 0  # more if a healthy call was slow


def test_hedges_stay_within_their_budget_however_slow_the_servers_get(
    stalled: CliServer, repo_server: ServerThread
) -> None:
    targets = [stalled.wait_ready(), repo_server.target]
    x = np.ones((1, 4), np.float32)

    async def main() -> tuple[int, int]:
        async with AsyncClient(
            targets, pool_size=2, timeout=1.0, retries=0, hedge_after=0.02
        ) as client:
            await client.wait_ready()
            assert (await client.predict("scale", x)).tolist() == [[3.0] * 4]
            _stall(stalled)
            for calls in range(2, 100):
                try:
                    await client.predict("scale", x)
                except torchwire.DeadlineExceededError:
                    return calls, client.hedged
        raise AssertionError("hedged without end")

    calls, hedged = asyncio.run(main())
    # Every call needs a hedge now; the budget gives HEDGE_BURST, then HEDGE_RATIO per call.
    assert HEDGE_BURST <= hedged <= HEDGE_BURST + HEDGE_RATIO * calls


def test_a_hedge_goes_to_another_target_whatever_the_pool_size(
    stalled: CliServer, repo_server: ServerThread
) -> None:
    assert hedge_channels(["a", "b", "a"]) == [1, 2, 1]
    assert hedge_channels(["a", "b", "c", "a"]) == [1, 2, 3, 1]
    assert hedge_channels(["a", "a"]) == [1, 0] and hedge_channels(["a"]) == [0]
    with Client(repo_server.target, pool_size=1, hedge_after=0.01) as alone:
        assert alone.hedge_after is None  # one connection: a hedge would reach the same server
    # Channels: stalled, healthy, stalled: the third's next channel is the stalled server's.
    targets = [stalled.wait_ready(), repo_server.target]
    x = np.ones((1, 4), np.float32)
    with Client(targets, pool_size=3, timeout=3, retries=0, hedge_after=0.05) as client:
        client.wait_ready()
        _stall(stalled)
        answers = [client.predict("scale", x) for _ in range(3)]
    assert [answer.tolist() for answer in answers] == [[[3.0] * 4]] * 3
    assert client.hedged >= 2


class Scripted:
    """A gRPC server that answers the seed API's Predict after ``delay_s`` with one float, or
    with the status ``fails_with``: what the client must cope with, at set times. ``called`` is
    set when a call arrives."""

    def __init__(self, delay_s: float, fails_with: grpc.StatusCode | None = None) -> None:
        self.delay_s, self.fails_with = delay_s, fails_with
        self.called = threading.Event()
        self.server = grpc.server(ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(self._predict)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("ModelService", {"Predict": handler}),)
        )
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _predict(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.called.set()
        time.sleep(self.delay_s)
        if self.fails_with is not None:
            context.abort(self.fails_with, "scripted failure")
        return pb.PredictResponse(outputs=[7.0]).SerializeToString()


@pytest.mark.parametrize("status", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
def test_an_answer_wins_over_a_failure_that_ends_in_the_same_loop_turn(
    status: grpc.StatusCode,
) -> None:
    # The first attempt fails 150 ms after it arrives; its hedge (sent after 10 ms) is answered
    # 80 ms after it arrives. The client's loop is then busy (a GC pause, CPU work) until both
    # have ended: it sees them at once.
    failing, answering = Scripted(0.15, status), Scripted(0.08)

    async def main() -> np.ndarray:
        targets = [failing.target, answering.target]
        async with AsyncClient(
            targets, pool_size=2, timeout=5, retries=0, hedge_after=0.01
        ) as client:
            await client.wait_ready()
            call = asyncio.ensure_future(client.predict("m", np.ones((1, 4), np.float32)))
            assert await asyncio.to_thread(answering.called.wait, 5)  # the hedge has arrived
            time.sleep(0.4)  # noqa: ASYNC251 (blocks the loop on purpose)
            return await call

    try:
        assert asyncio.run(main()).tolist() == [[7.0]]
    finally:
        failing.server.stop(0)
        answering.server.stop(0)
