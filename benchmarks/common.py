"""What the benchmarks share: where the project is, the demo models' shapes, starting
``torchwire serve`` on a free port and waiting until it answers, server CPU per answer, and the
closed-loop and rate-sweep runs of ``torchwire bench``'s load generator."""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from torchwire.bench import LoadConfig, RunResult, run_load, sweep
from torchwire.bench.report import sweep_summary
from torchwire.client import Client

ROOT = Path(__file__).resolve().parents[1]
TORCHWIRE = str(Path(sys.executable).parent / "torchwire")
"""The ``torchwire`` command of this Python's environment."""
console = Console(stderr=True)
SHAPES = {"recsys": (256,), "resnet18": (3, 224, 224), "out_of_range": (3,)}  # last: gpu.py's


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def torchwire(
    repository: Path,
    workers: int,
    model: str,
    extra: Sequence[str] = (),
    stderr: Any = None,
) -> Iterator[tuple[str, psutil.Process]]:
    """``torchwire serve --workers N`` (and ``extra`` flags) on a free port; yields its target
    and process."""
    port = free_port()
    command = [
        sys.executable, "-m", "torchwire", "serve", "--repository", str(repository),
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--http-port", "0",
        "--workers", str(workers), "--log-level", "warning", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, model, process)
        yield target, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(60)


def wait_serving(target: str, model: str, process: subprocess.Popen[bytes]) -> None:
    """Until ``model`` answers and gRPC health says SERVING: every model loaded. A server
    answers its first models while the others still load, and those loads' CPU (warm-up,
    timing) would count against the first run."""
    deadline = time.monotonic() + 180
    with Client(target, timeout=5, retries=0) as client:
        while True:
            try:
                client.wait_ready(timeout=2)
                client.predict(model, np.zeros((1, *SHAPES[model]), np.float32), timeout=60)
                if health_serving(target):
                    return
            except Exception:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"torchwire on {target} did not start")
            time.sleep(0.2)


def health_serving(target: str) -> bool:
    """Whether the server's overall gRPC health (service "") is SERVING."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def tree_cpu_s(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def minor_faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (``/proc/PID/stat`` field 10): each one a
    page the kernel mapped (and zeroed) for it, e.g. for a large buffer malloc took from mmap."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[7])


def load(target: str, model: str, **kwargs: Any) -> LoadConfig:
    base: dict[str, Any] = {"duration_s": 5.0, "warmup_s": 1.0, "channels": 4, "raw": True}
    return LoadConfig(target=target, model=model, shape=SHAPES[model], **{**base, **kwargs})


def run_with_server_cpu(
    config: LoadConfig, procs: int, server: psutil.Process
) -> tuple[RunResult, float]:
    """Run ``config``; return its result and the server's CPU seconds (every process of it) per
    answer. The warm-up's answers cost CPU too, so the run's CPU is spread over the answers
    counted, scaled up by the warm-up's share of the run (one at least)."""
    before = tree_cpu_s(server)
    result = run_load(config, procs, progress=False)
    spent = tree_cpu_s(server) - before
    return result, spent / max(1, result.ok * (1 + config.warmup_s / config.duration_s))


def closed(config: LoadConfig, procs: int, server: psutil.Process | None) -> dict[str, Any]:
    if server is None:
        result = run_load(config, procs, progress=False)
    else:
        result, cpu_s = run_with_server_cpu(config, procs, server)
    summary = result.summary()
    if server is not None and result.ok:  # an upper bound: the warm-up's CPU is in it
        summary["server_cpu_us_per_request_upper"] = round(cpu_s * 1e6, 1)
    summary["client_cpu_cores"] = round(sum(result.cpu_per_proc), 2)
    return summary


def best_rate(config: LoadConfig, procs: int, start: float) -> dict[str, Any]:
    steps = sweep(config, 50.0, procs, start_rate=start, growth=1.4, progress=False)
    return sweep_summary(steps)


def machine(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how a benchmark ran (``args``: its load processes and callers)."""
    return {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_procs": args.load_procs,
        "concurrency": args.concurrency,
    }
