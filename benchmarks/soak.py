"""Soak: a million requests (or ``--requests``) over both APIs, unary and streams, seed, V2 gRPC
and HTTP, while new model versions are hot-reloaded and callers cancel streams and give up on
deadlines. The server's RSS, threads, open files and in-flight gauge are read after a warm-up and
at the end: what a long-running server must not grow.

    .venv/bin/python benchmarks/soak.py [--requests 1000000]   # writes results/soak.{json,md}

One ``torchwire serve`` (the demo's recsys, ``--watch poll``; ``--serve`` adds flags, e.g.
``--serve "--workers 2 --engine on"``: its processes are summed), the load generator in this
process tree on the same machine. With ``--allow-client-shm true --model-control open`` among
the flags, one more caller passes recsys's input and output through system shared memory
regions it registered once (tritonclient), on a new connection every 100 calls (under
``--workers``, every worker in turn), and checks each answer is a probability.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import tritonclient.grpc as triton_grpc
import tritonclient.utils.shared_memory as shm
from common import ROOT, free_port, wait_serving
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from torchwire.bench import LoadConfig, run_load
from torchwire.repository import ensure_demo_repository

MIXES = [  # (protocol, stream): each takes its turn until the total is reached
    ("seed", False), ("seed", True), ("v2", False), ("v2", True), ("http", False),
]  # fmt: skip


def snapshot(process: psutil.Process, metrics_url: str) -> dict[str, Any]:
    page = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    inflight = sum(
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("torchwire_inflight_requests{")
    )
    tree = [process, *process.children(recursive=True)]  # workers and engines, if any
    return {
        "processes": len(tree),
        "rss_mb": round(sum(p.memory_info().rss for p in tree) / 2**20, 1),
        "threads": sum(p.num_threads() for p in tree),
        "fds": sum(p.num_fds() for p in tree),
        "inflight": inflight,
    }


def reloader(model_dir: Path, stop: threading.Event, every_s: float, done: list[int]) -> None:
    """A new version of recsys every ``every_s``: the watcher loads it, the old one drains."""
    version = 1
    while not stop.wait(every_s):
        version += 1
        staging = model_dir / f".{version}"
        staging.mkdir()
        shutil.copy(model_dir / "1" / "model.pt", staging / "model.pt")
        staging.rename(model_dir / str(version))
        done.append(version)


def canceller(target: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Streams cancelled half-way and unary calls with deadlines too short to meet."""
    request = pb.ModelInferRequest(model_name="recsys")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 256])
    request.raw_input_contents.append(np.zeros(256, "<f4").tobytes())
    data = request.SerializeToString()
    with grpc.insecure_channel(target) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        while not stop.is_set():
            call = stream(iter([data] * 50))
            next(call)
            call.cancel()
            counts["streams"] += 1
            try:
                unary(data, timeout=0.0002)
            except grpc.RpcError:
                counts["deadlines"] += 1
            time.sleep(0.05)


def shm_caller(target: str, stop: threading.Event, counts: Counter[str]) -> None:
    """V2 calls whose tensors pass through /dev/shm regions registered once, for the whole soak."""
    features = np.random.default_rng(0).random((1, 256), dtype=np.float32)
    key = f"/tw-soak-{os.getpid()}"
    given = shm.create_shared_memory_region("features", key, features.nbytes)
    taken = shm.create_shared_memory_region("score", key + "-score", 4)
    shm.set_shared_memory_region(given, [features])
    client = triton_grpc.InferenceServerClient(target)
    client.register_system_shared_memory("features", key, features.nbytes)
    client.register_system_shared_memory("score", key + "-score", 4)
    x = triton_grpc.InferInput("features", [1, 256], "FP32")
    x.set_shared_memory("features", features.nbytes)
    score = triton_grpc.InferRequestedOutput("score")
    score.set_shared_memory("score", 4)
    try:
        while not stop.is_set():
            client.close()  # a new connection: the kernel picks the worker
            client = triton_grpc.InferenceServerClient(target)
            for _ in range(100):
                shm.set_shared_memory_region(taken, [np.full((1, 1), -1.0, np.float32)])
                try:
                    client.infer("recsys", [x], outputs=[score])
                except InferenceServerException as exc:
                    counts[str(exc.status())] += 1
                    continue
                answer = shm.get_contents_as_numpy(taken, np.float32, [1, 1])[0, 0]
                counts["ok" if 0.0 <= answer <= 1.0 else "wrong answer"] += 1
    finally:
        client.unregister_system_shared_memory()
        client.close()
        shm.destroy_shared_memory_region(given)
        shm.destroy_shared_memory_region(taken)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--reload-every-s", type=float, default=15.0)
    parser.add_argument("--serve", default="", help="more `torchwire serve` flags")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    demo = ensure_demo_repository(Path(tempfile.gettempdir()) / "torchwire-bench-cache")
    work = Path(tempfile.mkdtemp(prefix="torchwire-soak-"))
    shutil.copytree(demo / "recsys", work / "recsys")
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        sys.executable, "-m", "torchwire", "serve", "--repository", str(work), "--host",
        "127.0.0.1", "--port", str(port), "--http-port", str(http_port), "--metrics-port",
        str(metrics_port), "--watch", "poll", "--watch-interval-s", "1", "--log-level", "warning",
        *shlex.split(args.serve),
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_serving(target, "recsys", server)
        process = psutil.Process(server.pid)

        def load(protocol: str, stream: bool, seconds: float) -> Any:
            config = LoadConfig(
                target=f"127.0.0.1:{http_port}" if protocol == "http" else target,
                model="recsys", shape=(256,), protocol=protocol, stream=stream,
                input_name="features", concurrency=32, duration_s=seconds, warmup_s=0.0,
                channels=2, timeout_s=30.0,
            )  # fmt: skip
            return run_load(config, 1, progress=False)

        for protocol, stream in MIXES:  # warm-up: every path once, then the baseline
            load(protocol, stream, 2.0)
        start = snapshot(process, metrics_url)
        stop, versions = threading.Event(), []
        counts = {"streams": 0, "deadlines": 0}
        helpers = [
            threading.Thread(
                target=reloader, args=(work / "recsys", stop, args.reload_every_s, versions)
            ),
            threading.Thread(target=canceller, args=(target, stop, counts)),
        ]
        through_shm: Counter[str] = Counter()
        if "--allow-client-shm" in args.serve:
            helpers.append(threading.Thread(target=shm_caller, args=(target, stop, through_shm)))
        for helper in helpers:
            helper.start()
        answered, failed, by_mix, began = 0, 0, {}, time.monotonic()
        errors: Counter[str] = Counter()
        turn, settled = 0, None
        while answered < args.requests:
            if settled is None and answered >= args.requests // 10:
                settled = snapshot(process, metrics_url)  # every path and a few reloads done
            protocol, stream = MIXES[turn % len(MIXES)]
            result = load(protocol, stream, 10.0)
            key = f"{protocol}{' stream' if stream else ''}"
            by_mix[key] = by_mix.get(key, 0) + result.ok
            answered += result.ok
            failed += result.error_count
            errors.update({f"{key}: {code}": n for code, n in result.errors.items()})
            turn += 1
            print(f"{answered:,} answered, {failed} failed ({key})", file=sys.stderr)
        stop.set()
        for helper in helpers:
            helper.join()
        time.sleep(2)  # the last cancelled calls and the last reload settle
        end = snapshot(process, metrics_url)
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - began
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "serve_flags": args.serve,
        "requests_answered": answered,
        "requests_failed": failed,
        "errors": dict(errors),
        "by_mix": by_mix,
        "seconds": round(elapsed),
        "reloads": len(versions),
        "cancelled_streams": counts["streams"],
        "missed_deadlines": counts["deadlines"],
        "through_shared_memory": dict(through_shm),
        "start": start,
        "at_10_percent": settled,
        "end": end,
        "rss_growth_pct": round((end["rss_mb"] / start["rss_mb"] - 1) * 100, 2),
        "rss_growth_after_10_percent_pct": round((end["rss_mb"] / settled["rss_mb"] - 1) * 100, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "-".join(["soak", *(flag.lstrip("-") for flag in shlex.split(args.serve))])
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    flags = f" {args.serve}" if args.serve else ""
    md = (
        f"# Soak (benchmarks/soak.py{flags}), {results['when']}\n\n"
        f"{answered:,} requests answered ({failed} failed) in {results['seconds']} s over "
        f"{json.dumps(by_mix)}; {len(versions)} hot reloads, {counts['streams']} streams "
        f"cancelled half-way, {counts['deadlines']} unary calls past a 0.2 ms deadline.\n\n"
        + (f"Failed, by mix and code: {json.dumps(dict(errors))}.\n\n" if errors else "")
        + (
            f"Beside them, through shared memory regions: {json.dumps(dict(through_shm))}.\n\n"
            if through_shm
            else ""
        )
        + f"Summed over the server's {end['processes']} process(es).\n\n"
        "| | RSS MB | threads | open files | in-flight gauge |\n|---|---:|---:|---:|---:|\n"
        + "".join(
            f"| {label} | {row['rss_mb']} | {row['threads']} | {row['fds']} | "
            f"{row['inflight']:.0f} |\n"
            for label, row in (
                ("after warm-up", start),
                ("after 10 % of the requests", settled),
                ("end", end),
            )
        )
        + "\n"
        f"RSS growth: {results['rss_growth_pct']} % from the warm-up, "
        f"{results['rss_growth_after_10_percent_pct']} % over the last 90 % of the requests.\n"
    )
    (args.out / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
