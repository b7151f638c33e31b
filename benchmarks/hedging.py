"""What ``Client(hedge_after=...)`` does to the tail when one of two replicas stalls now and then.

    .venv/bin/python benchmarks/hedging.py [--rate 800] [--seconds 8] [--rounds 2]
        [--hedge-after-ms 10] [--pause-ms 50] [--period-ms 500]

Two torchwire servers (the demo's recsys, one process each). One of them is stopped with SIGSTOP
for ``--pause-ms`` every ``--period-ms`` (a long GC pause, a starved container: it answers
nothing meanwhile). One ``AsyncClient`` over both targets sends ``--rate`` calls a second, open
loop (each latency counted from when the call was due, so a stalled client loop counts too),
with no hedging and then with hedging, in turns, ``--rounds`` times. Also once with no stall, to
show what hedging costs when nothing is slow. Per run: P50, P99, P99.9, max, answers/s, the
share of calls hedged, errors, and the client process's CPU per call. Writes ``hedging.json``
and ``hedging.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, machine, torchwire

from torchwire import AsyncClient
from torchwire.repository import ensure_demo_repository


def stall(pid: int, pause_s: float, period_s: float, stop: threading.Event) -> None:
    """SIGSTOP ``pid`` for ``pause_s`` every ``period_s`` until ``stop``; leave it running."""
    while not stop.wait(period_s - pause_s):
        os.kill(pid, signal.SIGSTOP)
        try:
            stop.wait(pause_s)
        finally:
            os.kill(pid, signal.SIGCONT)


async def open_loop(
    targets: list[str], hedge_after_s: float | None, rate: float, seconds: float
) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    async with AsyncClient(
        targets, pool_size=4, timeout=5.0, retries=0, hedge_after=hedge_after_s
    ) as client:
        await client.wait_ready()

        async def call(due: float) -> None:
            nonlocal errors
            try:
                await client.predict("recsys", x)
            except Exception:
                errors += 1
                return
            latencies.append(loop.time() - due)

        cpu, start = time.process_time(), loop.time()
        calls = []
        for i in range(int(rate * seconds)):
            due = start + i / rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            calls.append(asyncio.ensure_future(call(due)))
        await asyncio.gather(*calls)
        cpu = time.process_time() - cpu
        hedged = client.hedged
    ms = np.array(latencies) * 1000
    return {
        "answers_per_s": round(len(ms) / seconds, 1),
        "client_cpu_us_per_call": round(cpu / max(1, len(calls)) * 1e6, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "p999_ms": round(float(np.percentile(ms, 99.9)), 2),
        "max_ms": round(float(ms.max()), 2),
        "hedged_share": round(hedged / max(1, len(ms) + errors), 4),
        "errors": errors,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    demo = ensure_demo_repository(Path(tempfile.gettempdir()) / "torchwire-bench-cache")
    hedge_s = args.hedge_after_ms / 1000
    results: dict[str, Any] = {"machine": machine(args), "runs": []}
    with torchwire(demo, 1, "recsys") as (a, process), torchwire(demo, 1, "recsys") as (b, _):
        # This process holds torch's objects (common imports it): a full garbage collection
        # over them stalled the client 100-120 ms, once a run. Frozen, as the server's are.
        gc.collect()
        gc.freeze()
        for round_ in range(args.rounds):
            plans = [("no stall", None, False), ("no stall", hedge_s, False)] if not round_ else []
            plans += [("stalls", None, True), ("stalls", hedge_s, True)]
            for what, hedge, stalls in plans:
                stop = threading.Event()
                staller = threading.Thread(
                    target=stall,
                    args=(process.pid, args.pause_ms / 1000, args.period_ms / 1000, stop),
                )
                if stalls:
                    staller.start()
                try:
                    row = asyncio.run(open_loop([a, b], hedge, args.rate, args.seconds))
                finally:
                    stop.set()
                    if stalls:
                        staller.join()
                row.update(round=round_ + 1, replicas=what, hedge_after_ms=hedge and hedge * 1000)
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
    return results


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    m = r["machine"]
    lines = [
        "# Hedged calls: the tail when one of two replicas stalls (benchmarks/hedging.py)",
        "",
        f"{m['when']}, {m['cpus']} cores, Python {m['python']}, torch {m['torch']}. Two recsys "
        f"servers; one stopped (SIGSTOP) {args.pause_ms} ms every {args.period_ms} ms in the "
        f"'stalls' runs; one AsyncClient over both, {args.rate:g} calls/s open loop, "
        f"{args.seconds} s per run.",
        "",
        "| round | replicas | hedge after | answers/s | P50 ms | P99 ms | P99.9 ms | max ms "
        "| hedged | errors | client CPU us/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["runs"]:
        hedge = f"{row['hedge_after_ms']:g} ms" if row["hedge_after_ms"] else "never"
        lines.append(
            f"| {row['round']} | {row['replicas']} | {hedge} | {row['answers_per_s']:,.0f} | "
            f"{row['p50_ms']} | {row['p99_ms']} | {row['p999_ms']} | {row['max_ms']} | "
            f"{row['hedged_share']:.1%} | {row['errors']} | {row['client_cpu_us_per_call']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=800.0, help="calls/s, open loop")
    parser.add_argument("--hedge-after-ms", type=float, default=10.0)
    parser.add_argument("--pause-ms", type=float, default=50.0)
    parser.add_argument("--period-ms", type=float, default=500.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.load_procs, args.concurrency = 1, 0  # for machine(): open loop
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hedging.json").write_text(json.dumps(results, indent=2))
    (args.out / "hedging.md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
