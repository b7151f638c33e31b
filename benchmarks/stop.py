"""Stopping under load: what callers get when ``torchwire serve`` is sent SIGTERM mid-traffic.

    .venv/bin/python benchmarks/stop.py [--runs 5] [--callers 16] [-- SERVE FLAGS]

Each run starts ``torchwire serve`` (the demo's recsys), lets ``--callers`` callers (threads, or
``--client aio``: grpc.aio coroutines, each on a channel of its own) call
``/ModelService/Predict`` in a closed loop on plain gRPC channels (no retries) until 500 calls
were answered, sends SIGTERM, and counts each caller's outcomes until shortly after the process
exited: OK (before and after the signal), UNAVAILABLE (refused: clients retry it), and anything
else, CANCELLED above all (lost: no client retries it). Prints one line per run and exits 1 if a
call ended other than OK or UNAVAILABLE, or the server did not exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import numpy as np
from common import TORCHWIRE, free_port

from torchwire._proto import modelservice_messages_pb2 as pb

PREDICT = "/ModelService/Predict"


class Tally:
    """The callers' outcomes; warm once 500 calls were answered."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.warm, self.done = threading.Event(), threading.Event()
        self.signalled = False

    def record(self, failure: grpc.RpcError | None) -> None:
        if failure is None:
            outcome = "OK after SIGTERM" if self.signalled else "OK"
        else:
            outcome = failure.code().name
        with self.lock:
            self.outcomes[outcome] += 1
            if self.outcomes["OK"] >= 500:
                self.warm.set()


def sync_caller(target: str, request: bytes, tally: Tally) -> None:
    with grpc.insecure_channel(target) as channel:
        predict = channel.unary_unary(PREDICT)
        while not tally.done.is_set():
            try:
                predict(request, timeout=30)
                tally.record(None)
            except grpc.RpcError as exc:
                tally.record(exc)


async def aio_caller(target: str, request: bytes, tally: Tally) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        predict = channel.unary_unary(PREDICT)
        while not tally.done.is_set():
            try:
                await predict(request, timeout=30)
                tally.record(None)
            except grpc.RpcError as exc:
                tally.record(exc)


def one_run(callers: int, client: str, flags: list[str]) -> tuple[int, Counter[str]]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    command = [
        TORCHWIRE, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--http-port", "0", "--log-level", "warning", *flags,
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    request = pb.PredictRequest(
        raw_inputs=np.ones(256, np.float32).tobytes(), metadata={"model": "recsys"}
    ).SerializeToString()
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
        channel.unary_unary(PREDICT)(request, timeout=60)
    tally = Tally()

    async def aio_callers() -> None:
        await asyncio.gather(*(aio_caller(target, request, tally) for _ in range(callers)))

    if client == "aio":  # one event loop, each caller a channel of its own
        threads = [threading.Thread(target=asyncio.run, args=(aio_callers(),))]
    else:  # a thread and a channel per caller
        threads = [
            threading.Thread(target=sync_caller, args=(target, request, tally))
            for _ in range(callers)
        ]
    for thread in threads:
        thread.start()
    try:
        tally.warm.wait(120)
        tally.signalled = True
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
        time.sleep(0.3)  # the callers see the port closed
    finally:
        tally.done.set()
        for thread in threads:
            thread.join(60)
        if server.poll() is None:
            server.kill()
    return code, tally.outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument(
        "--client", choices=["sync", "aio"], default="sync", help="threads, or grpc.aio callers"
    )
    parser.add_argument("flags", nargs="*", help="after --: extra torchwire serve flags")
    args = parser.parse_args()
    failed = False
    for run in range(1, args.runs + 1):
        code, outcomes = one_run(args.callers, args.client, args.flags)
        lost = {
            k: v for k, v in outcomes.items() if k not in ("OK", "OK after SIGTERM", "UNAVAILABLE")
        }
        failed |= bool(lost) or code != 0
        print(f"run {run}: exit {code}; " + ", ".join(f"{k} {v:,}" for k, v in outcomes.items()))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
