"""Overload: what a server answers in time when offered more than it can do.

    .venv/bin/python benchmarks/overload.py [--factors 1.2,2,4] [--deadline-ms 100] [-- FLAGS]

The server (``torchwire serve`` on the demo repository, recsys) runs pinned to one core and the
load generator (``torchwire bench``'s, one process) to another, so the client is never what
limits. First its capacity: the closed-loop QPS at 32 callers. Then, for each factor, an open
loop at factor x capacity with a deadline per request: goodput (answers within the deadline per
second), the refusals by status, the P99 of the answered requests, and one closed-loop run right
after (normal service should come back at once). Extra ``torchwire serve`` flags go after
``--``. Writes ``overload.json`` and ``overload.md`` to ``--out`` (``overload-nginxN.*`` with
``--nginx N``).

``--nginx N`` puts the shipped ``deploy/nginx/torchwire.conf`` in front (one worker, pinned to
the server's core, so that its CPU counts against the same capacity), with its admission limit
set to N inference calls in flight; capacity is then measured through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, TORCHWIRE, free_port

from torchwire.bench import LoadConfig, run_load
from torchwire.client import Client

NGINX_CONFIG = ROOT / "deploy" / "nginx" / "torchwire.conf"
NGINX_LIMIT = "limit_conn torchwire_inference 64;"


def start_server(core: int, flags: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        "taskset", "-c", str(core), TORCHWIRE, "serve", "--host", "127.0.0.1", "--port",
        str(port), "--metrics-port", "0", "--http-port", "0", "--log-level", "warning", *flags,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with Client(target, timeout=5, retries=0) as client:
        while True:
            try:
                client.wait_ready(timeout=2)
                client.predict("recsys", np.zeros((1, 256), np.float32))
                return process, target
            except Exception:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)


def start_nginx(core: int, upstream: str, limit: int, prefix: Path) -> tuple[Any, str]:
    """The shipped nginx config in front of ``upstream`` (its second replica marked down), one
    worker pinned to ``core``, at most ``limit`` inference calls in flight; return the process and
    nginx's target."""
    front = free_port()
    text = NGINX_CONFIG.read_text()
    assert NGINX_LIMIT in text, "the shipped config's admission limit moved"
    text = (
        text.replace("50050", str(front))
        .replace("server 127.0.0.1:50051 ", f"server {upstream} ")
        .replace("server 127.0.0.1:50052 ", "server 127.0.0.1:50052 down ")
        .replace("worker_processes auto;", "worker_processes 1;")
        .replace(NGINX_LIMIT, f"limit_conn torchwire_inference {limit};")
    )
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(text)
    command = ["taskset", "-c", str(core), "nginx", "-c", str(prefix / "nginx.conf")]
    process = subprocess.Popen([*command, "-p", f"{prefix}/", "-g", "daemon off;"])
    target = f"127.0.0.1:{front}"
    with Client(target, timeout=5, retries=0) as client:
        client.wait_ready(timeout=30)
    return process, target


def measure(config: LoadConfig) -> dict[str, Any]:
    result = run_load(config, 1, progress=False)
    summary = result.summary()
    return {
        "offered_rate": config.rate or None,
        "answered_per_s": round(result.qps, 1),
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "errors": dict(result.errors),
        "client_cpu_cores": round(sum(result.cpu_per_proc), 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    client_core = args.client_core
    os.sched_setaffinity(0, {client_core})  # the load processes inherit it
    server, target = start_server(args.server_core, args.flags)
    front = None
    if args.nginx:
        prefix = Path(tempfile.mkdtemp(prefix="overload-nginx-"))
        front, target = start_nginx(args.server_core, target, args.nginx, prefix)
    base = LoadConfig(
        target=target, model="recsys", shape=(256,), duration_s=args.duration, warmup_s=1.0,
        channels=2, raw=True, timeout_s=args.deadline_ms / 1000, batch=args.batch,
    )  # fmt: skip
    try:
        closed = dataclasses.replace(base, concurrency=32, timeout_s=5.0)
        capacity = measure(closed)
        rows = []
        for factor in args.factors:
            rate = factor * capacity["answered_per_s"]
            offered = dataclasses.replace(base, rate=rate)
            row = {"factor": factor, **measure(offered)}
            row["goodput_vs_capacity"] = round(
                row["answered_per_s"] / capacity["answered_per_s"], 3
            )
            row["after"] = measure(closed)["answered_per_s"]
            rows.append(row)
    finally:
        if front is not None:
            front.terminate()
            front.wait(30)
        server.terminate()
        server.wait(30)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "server_flags": args.flags,
        "nginx_limit": args.nginx or None,
        "deadline_ms": args.deadline_ms,
        "batch": args.batch,
        "capacity_qps": capacity["answered_per_s"],
        "rows": rows,
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# torchwire under overload",
        "",
        f"{r['when']}; recsys, {r.get('batch', 1)} item(s) per request; server pinned to one "
        "core, load generator to another; capacity "
        f"(closed loop, 32 callers) {r['capacity_qps']:,.0f} QPS; deadline {r['deadline_ms']} ms; "
        f"server flags {r['server_flags'] or 'none'}; "
        + (
            f"through nginx (shipped config, at most {r['nginx_limit']} inference calls in "
            f"flight; one worker on the server's core). Command: `benchmarks/overload.py "
            f"--nginx {r['nginx_limit']}`."
            if r.get("nginx_limit")
            else "straight to torchwire. Command: `benchmarks/overload.py`."
        ),
        "",
        "| offered | answered in time /s | vs capacity | P99 of answered ms | refused, by status "
        "| closed loop right after |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for row in r["rows"]:
        errors = ", ".join(f"{k} {v:,}" for k, v in row["errors"].items()) or "none"
        lines.append(
            f"| {row['factor']}x ({row['offered_rate']:,.0f}/s) | {row['answered_per_s']:,.0f} "
            f"| {row['goodput_vs_capacity']:.2f}x | {row['p99_ms']:.1f} | {errors} "
            f"| {row['after']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--factors", default="1.2,2,4")
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument(
        "--batch", type=int, default=1,
        help="items per request: more work per call, for a server the load generator cannot "
        "overload with single items (the native front end on one core)",
    )  # fmt: skip
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument(
        "--nginx", type=int, default=0, metavar="N",
        help="through the shipped nginx config, at most N inference calls in flight (0: direct)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", help="file name of the results (default: overload[-nginxN])")
    parser.add_argument("flags", nargs="*", help="after --: extra torchwire serve flags")
    args = parser.parse_args()
    args.factors = [float(f) for f in args.factors.split(",")]
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or (f"overload-nginx{args.nginx}" if args.nginx else "overload")
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
