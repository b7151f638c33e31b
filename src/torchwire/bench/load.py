"""One load process: sends pre-serialized requests (the seed API, KServe V2 over gRPC, or V2
over HTTP with binary tensors or JSON), closed or open loop, unary or stream (gRPC only).

Closed loop: ``concurrency`` callers, each sending its next request when the last is answered.
Open loop: requests leave at scheduled instants (constant spacing or Poisson arrivals) whatever
the server does, and latency counts from the scheduled instant, so a stalled server shows up as
latency rather than as fewer requests (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from torchwire.bench.stats import Recorder
from torchwire.client import _v2 as v2
from torchwire.client._channel import channel_options
from torchwire.client._seed import PREDICT, PREDICT_STREAM, encode_request
from torchwire.errors import TorchwireError

MAX_OUTSTANDING = 50_000  # open loop: beyond this many unanswered requests, count an overflow
HTTP_PROTOCOLS = ("http", "http_json")  # binary tensors (as tritonclient.http sends) or JSON


@dataclass(frozen=True)
class LoadConfig:
    """What one load process does (the runner divides concurrency and rate among processes)."""

    target: str
    model: str
    shape: tuple[int, ...]
    batch: int = 1
    version: str | None = None
    concurrency: int = 0
    rate: float = 0.0
    poisson: bool = False
    stream: bool = False
    duration_s: float = 10.0
    warmup_s: float = 1.0
    timeout_s: float = 5.0
    channels: int = 1
    raw: bool = True
    seed: int = 0
    protocol: str = "seed"  # "v2": ModelInfer / ModelStreamInfer; "http", "http_json": REST
    input_name: str = ""  # v2: the model's first input
    datatype: str = "FP32"  # v2: its datatype
    token: str = ""  # sent as "authorization: Bearer <token>" when set


# What a process reports: ("tick", second, ok, errors, histogram) each second of the measured
# part, then ("done", cpu seconds, wall seconds, requests sent while measuring), or
# ("failed", message) if it broke.
Report = Callable[[tuple[Any, ...]], None]


def make_requests(config: LoadConfig, variants: int = 8) -> list[bytes]:
    rng = np.random.default_rng(config.seed)
    shape = (config.batch, *config.shape)
    # The model's dtype (the seed API sends floats, which must then be whole numbers); integers
    # (e.g. UINT8 images) as small values that every integer dtype holds: 0-99, so a model that
    # indexes a table of fewer rows with them fails.
    dtype = v2.wire_dtype(config.datatype)
    arrays = [
        rng.integers(0, 2 if dtype.kind == "b" else 100, shape).astype(dtype)
        if dtype.kind in "biu"
        else rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        for _ in range(variants)
    ]
    if config.protocol in HTTP_PROTOCOLS:
        return [http_body(config, a) for a in arrays]
    if config.protocol == "v2":
        spec = v2.Spec(config.input_name, config.datatype, config.shape)
        return [v2.encode_infer(config.model, a, config.version, spec) for a in arrays]
    return [encode_request(config.model, a, config.version, config.raw) for a in arrays]


def http_body(config: LoadConfig, array: np.ndarray[Any, Any]) -> bytes:
    """A V2 REST request: JSON data, or a JSON header and the raw tensor after it."""
    tensor: dict[str, Any] = {
        "name": config.input_name,
        "shape": list(array.shape),
        "datatype": config.datatype,
    }
    if config.protocol == "http_json":
        tensor["data"] = array.reshape(-1).tolist()
        return json.dumps({"inputs": [tensor]}).encode()
    raw = np.ascontiguousarray(array, dtype=v2.wire_dtype(config.datatype)).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
    return json.dumps(header).encode() + raw


class _HttpStatus(Exception):
    """A REST answer other than 200."""


def stream_error(config: LoadConfig, answer: bytes) -> str | None:
    """The status of an in-stream V2 error answer, or None for an answer (seed: always None)."""
    if config.protocol != "v2":
        return None
    try:
        v2.decode_stream(answer)
    except TorchwireError as exc:
        return exc.code
    return None


class LoadProcess:
    def __init__(self, config: LoadConfig, report: Report) -> None:
        self.config = config
        self.report = report
        self.recorder = Recorder()
        self.measuring = False
        self.sent = 0  # requests sent while measuring
        self.requests = make_requests(config)
        self.unary_path, self.stream_path = (
            (PREDICT, PREDICT_STREAM) if config.protocol == "seed" else (v2.INFER, v2.STREAM)
        )
        options = channel_options(0, 0, None)
        self.http = config.protocol in HTTP_PROTOCOLS
        self.channels = [
            grpc.aio.insecure_channel(config.target, options)
            for _ in range(0 if self.http else max(1, config.channels))
        ]
        self._session: Any = None  # aiohttp, opened on the running loop
        self.auth = (("authorization", f"Bearer {config.token}"),) if config.token else None
        self._turn = 0

    def _request(self) -> tuple[bytes, bool]:
        """The next request, and whether it counts (sent while measuring)."""
        self._turn += 1
        counted = self.measuring
        self.sent += counted
        return self.requests[self._turn % len(self.requests)], counted

    def _done(self, intended: float, error: str | None, counted: bool) -> None:
        if not counted:
            return
        if error is None:
            self.recorder.record(time.perf_counter() - intended)
        else:
            self.recorder.error(error)

    # -- unary ---------------------------------------------------------------------------------

    async def _unary(self, predict: Any, intended: float) -> None:
        request, counted = self._request()
        try:
            await predict(request, timeout=self.config.timeout_s, metadata=self.auth)
            self._done(intended, None, counted)
        except grpc.aio.AioRpcError as exc:
            self._done(intended, exc.code().name, counted)
        except _HttpStatus as exc:
            self._done(intended, str(exc), counted)
        except TimeoutError:
            self._done(intended, "DEADLINE_EXCEEDED", counted)
        except OSError as exc:  # aiohttp's connection errors
            self._done(intended, f"HTTP_{type(exc).__name__}", counted)

    def _predict(self, index: int) -> Any:
        """What sends one unary request: a gRPC callable, or a REST POST."""
        if not self.http:
            return self.channels[index % len(self.channels)].unary_unary(self.unary_path)
        import aiohttp

        config = self.config
        version = f"/versions/{config.version}" if config.version else ""
        url = f"http://{config.target}/v2/models/{config.model}{version}/infer"
        headers = {"Content-Type": "application/json"}
        if config.protocol == "http":  # the JSON header, then the tensor's bytes
            item_bytes = int(np.prod(config.shape)) * v2.wire_dtype(config.datatype).itemsize
            header_end = len(self.requests[0]) - config.batch * item_bytes
            headers = {"Inference-Header-Content-Length": str(header_end)}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"

        async def post(body: bytes, timeout: float, metadata: Any = None) -> None:
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, force_close=False)
                )
            async with self._session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                await response.read()
                if response.status != 200:
                    raise _HttpStatus(f"HTTP_{response.status}")

        return post

    async def _closed_caller(self, index: int, until: float) -> None:
        predict = self._predict(index)
        while time.perf_counter() < until:
            await self._unary(predict, time.perf_counter())

    # -- stream --------------------------------------------------------------------------------

    async def _closed_streamer(self, index: int, until: float) -> None:
        open_stream = self.channels[index % len(self.channels)].stream_stream(self.stream_path)
        while time.perf_counter() < until:
            call = open_stream(metadata=self.auth)
            intended, counted = time.perf_counter(), False
            try:
                while time.perf_counter() < until:
                    intended = time.perf_counter()
                    request, counted = self._request()
                    await call.write(request)
                    answer = await call.read()
                    if answer is grpc.aio.EOF:
                        raise RuntimeError("stream ended early")
                    self._done(intended, stream_error(self.config, answer), counted)
                await call.done_writing()
            except grpc.aio.AioRpcError as exc:
                self._done(intended, exc.code().name, counted)
            finally:
                call.cancel()

    # -- open loop -----------------------------------------------------------------------------

    async def _open_loop(self, until: float) -> None:
        config = self.config
        rng = random.Random(config.seed)
        spacing = 1.0 / config.rate
        tasks: set[asyncio.Task[None]] = set()
        lanes = [_StreamLane(self, ch) for ch in self.channels] if config.stream else []
        predicts = [self._predict(i) for i in range(max(1, len(self.channels)))]
        intended = time.perf_counter()
        count = 0
        while intended < until:
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            while intended <= time.perf_counter() and intended < until:  # fire every due request
                count += 1
                if len(tasks) + sum(len(lane.pending) for lane in lanes) >= MAX_OUTSTANDING:
                    self.sent += self.measuring
                    self._done(intended, "CLIENT_OVERFLOW", self.measuring)
                elif lanes:
                    lanes[count % len(lanes)].send(intended)
                else:
                    task = asyncio.create_task(
                        self._unary(predicts[count % len(predicts)], intended)
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                intended += rng.expovariate(config.rate) if config.poisson else spacing
        if tasks:
            await asyncio.wait(tasks, timeout=config.timeout_s)
        for lane in lanes:
            await lane.finish(config.timeout_s)

    # -- the run -------------------------------------------------------------------------------

    async def _ticker(self, start: float) -> None:
        second = 0
        while True:
            await asyncio.sleep(max(0.0, start + second + 1 - time.perf_counter()))
            self.report(("tick", second, *self.recorder.take()))
            second += 1

    async def run(self) -> None:
        config = self.config
        started = time.perf_counter()
        measure_from = started + config.warmup_s
        until = measure_from + config.duration_s
        cpu_started = time.process_time()

        async def begin_measuring() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            self.measuring = True
            self.recorder.take()
            self.sent = 0

        switch = asyncio.create_task(begin_measuring())
        ticker = asyncio.create_task(self._ticker(measure_from))
        try:
            if config.rate > 0:
                await self._open_loop(until)
            else:
                worker = self._closed_streamer if config.stream else self._closed_caller
                await asyncio.gather(*(worker(i, until) for i in range(config.concurrency)))
        finally:
            elapsed_measured = min(time.perf_counter(), until) - measure_from
            self.measuring = False
            for task in (switch, ticker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # What arrives after the last full second belongs to it, not to a stub second.
            last = max(0, math.ceil(config.duration_s) - 1)
            self.report(("tick", min(int(elapsed_measured), last), *self.recorder.take()))
            await asyncio.gather(*(ch.close() for ch in self.channels))
            if self._session is not None:
                await self._session.close()
            cpu = time.process_time() - cpu_started
            self.report(("done", cpu, time.perf_counter() - started, self.sent))


class _StreamLane:
    """One PredictStream of the open loop: writes at the scheduled instants, answers in order."""

    def __init__(self, load: LoadProcess, channel: grpc.aio.Channel) -> None:
        self.load = load
        self.pending: deque[tuple[float, bool]] = deque()
        self._outbox: asyncio.Queue[float | None] = asyncio.Queue()
        self._call = channel.stream_stream(load.stream_path)(metadata=load.auth)
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    def send(self, intended: float) -> None:
        self._outbox.put_nowait(intended)

    async def _write(self) -> None:
        while (intended := await self._outbox.get()) is not None:
            request, counted = self.load._request()
            self.pending.append((intended, counted))
            await self._call.write(request)
        await self._call.done_writing()

    async def _read(self) -> None:
        try:
            while (answer := await self._call.read()) is not grpc.aio.EOF:
                intended, counted = self.pending.popleft()
                self.load._done(intended, stream_error(self.load.config, answer), counted)
        except grpc.aio.AioRpcError as exc:
            while self.pending:
                intended, counted = self.pending.popleft()
                self.load._done(intended, exc.code().name, counted)

    async def finish(self, timeout_s: float) -> None:
        self._outbox.put_nowait(None)
        await asyncio.wait({self._writer, self._reader}, timeout=timeout_s)
        for task in (self._writer, self._reader):
            task.cancel()
        self._call.cancel()
        while self.pending:
            intended, counted = self.pending.popleft()
            self.load._done(intended, "DEADLINE_EXCEEDED", counted)


def process_main(config: LoadConfig, queue: Any, index: int) -> None:
    """Entry point of a load process: run, sending reports tagged with ``index``."""

    def report(message: tuple[Any, ...]) -> None:
        queue.put((index, *message))

    async def main() -> None:
        await LoadProcess(config, report).run()  # channels belong to this process's loop

    try:
        asyncio.run(main())
    except Exception as exc:
        report(("failed", f"{type(exc).__name__}: {exc}"))
