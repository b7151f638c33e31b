"""gRPC vs HTTP/REST, side by side in one run, same server, same models (the demo's recsys and
resnet18): KServe V2 over gRPC (raw tensors), V2 over HTTP with Triton's binary tensors, and V2
over HTTP with JSON. For each: closed-loop QPS and P99, P50 at concurrency 1, the highest
open-loop rate under P99 < 50 ms (recsys), bytes on the wire per request (loopback, both
directions, TCP/IP headers included), server CPU per request. Then gRPC alone with the HTTP port
on and off, to show that serving HTTP costs gRPC nothing.

    .venv/bin/python benchmarks/rest_vs_grpc.py   # writes benchmarks/results/rest_vs_grpc.{json,md}

One server process at a time, the load generator (``torchwire bench``'s) on the same machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from common import ROOT, SHAPES, free_port, wait_serving

from torchwire.bench import LoadConfig, run_load, sweep
from torchwire.bench.report import sweep_summary
from torchwire.repository import ensure_demo_repository

INPUTS = {"recsys": "features", "resnet18": "image"}
PROTOCOLS = {"gRPC (V2, raw)": "v2", "HTTP binary": "http", "HTTP JSON": "http_json"}


@contextmanager
def server(demo: Path, http: bool) -> Iterator[tuple[str, str, psutil.Process]]:
    port, http_port = free_port(), free_port() if http else 0
    command = [
        sys.executable, "-m", "torchwire", "serve", "--repository", str(demo), "--host",
        "127.0.0.1", "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0",
        "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        for model in INPUTS:
            wait_serving(f"127.0.0.1:{port}", model, process)
        yield f"127.0.0.1:{port}", f"127.0.0.1:{http_port}", psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(60)


def config(target: str, model: str, protocol: str, **kwargs: Any) -> LoadConfig:
    base: dict[str, Any] = {"duration_s": 4.0, "warmup_s": 1.0, "channels": 2}
    return LoadConfig(
        target=target, model=model, shape=SHAPES[model], protocol=protocol,
        input_name=INPUTS[model], **{**base, **kwargs},
    )  # fmt: skip


def measured(load: LoadConfig, process: psutil.Process) -> dict[str, Any]:
    """One closed-loop run with the server's CPU and the loopback bytes per request."""
    cpu, wire = process.cpu_times(), psutil.net_io_counters(pernic=True)["lo"].bytes_sent
    result = run_load(load, 1, progress=False)
    spent = sum(process.cpu_times()[:2]) - sum(cpu[:2])
    sent = psutil.net_io_counters(pernic=True)["lo"].bytes_sent - wire
    summary = result.summary()
    answered = max(1, result.ok)
    # Warm-up requests cost CPU and bytes too: spread over all sent, not only those measured.
    total = answered * (1 + load.warmup_s / load.duration_s)
    return {
        "qps": summary["qps"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "errors": result.error_count,
        "server_cpu_us": round(spent / total * 1e6, 1),
        "wire_bytes": round(sent / total),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    demo = ensure_demo_repository(Path(tempfile.gettempdir()) / "torchwire-bench-cache")
    results: dict[str, Any] = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "protocols": {},
        "http_on_off": {},
    }
    with server(demo, http=True) as (grpc_target, http_target, process):
        for model in INPUTS:  # the model's first batches of each size are slower: not measured
            run_load(
                config(grpc_target, model, "v2", concurrency=32, duration_s=3.0), 1, progress=False
            )
        for name, protocol in PROTOCOLS.items():
            target = grpc_target if protocol == "v2" else http_target
            row: dict[str, Any] = {}
            for model, concurrency in (("recsys", 32), ("resnet18", 4)):
                row[model] = measured(
                    config(target, model, protocol, concurrency=concurrency), process
                )
                row[model]["p50_ms_c1"] = measured(
                    config(target, model, protocol, concurrency=1), process
                )["p50_ms"]
            if args.sweep:
                steps = sweep(
                    config(target, "recsys", protocol, duration_s=2.0), 50.0, 1,
                    start_rate=400.0, growth=1.35, progress=False,
                )  # fmt: skip
                row["recsys"]["sweep"] = sweep_summary(steps)
            results["protocols"][name] = row
            print(name, json.dumps(row), file=sys.stderr)
        on = measured(config(grpc_target, "recsys", "v2", concurrency=32), process)
    with server(demo, http=False) as (grpc_target, _, process):
        run_load(
            config(grpc_target, "recsys", "v2", concurrency=32, duration_s=3.0), 1, progress=False
        )
        off = measured(config(grpc_target, "recsys", "v2", concurrency=32), process)
    results["http_on_off"] = {"on": on, "off": off}
    return results


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# gRPC vs HTTP/REST (benchmarks/rest_vs_grpc.py)",
        "",
        f"{m['when']}, {m['cpus']} cores, Python {m['python']}, torch {m['torch']}; one server, "
        "the load generator on the same host (1 process).",
        "",
        "| protocol | model | closed-loop QPS (c) | P99 ms | P50 ms at c=1 | bytes on the wire "
        "per request | server CPU us/request | QPS at P99<50ms (open loop) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in r["protocols"].items():
        for model, c in (("recsys", 32), ("resnet18", 4)):
            x = row[model]
            rate = x.get("sweep", {}).get("qps", "")
            lines.append(
                f"| {name} | {model} | {x['qps']:,.0f} ({c}) | {x['p99_ms']:.1f} | "
                f"{x['p50_ms_c1']:.2f} | {x['wire_bytes']:,} | {x['server_cpu_us']:,.0f} | "
                f"{rate} |"
            )
    on, off = r["http_on_off"]["on"], r["http_on_off"]["off"]
    lines += [
        "",
        f"gRPC recsys, c=32, with the HTTP port on: {on['qps']:,.0f} QPS, {on['server_cpu_us']}"
        f" us CPU/request; off: {off['qps']:,.0f} QPS, {off['server_cpu_us']} us "
        f"({on['qps'] / off['qps']:.2f}x).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rest_vs_grpc.json").write_text(json.dumps(results, indent=2))
    (args.out / "rest_vs_grpc.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
