"""``torchwire serve --workers N`` measured: recsys QPS by worker count, against N separate
processes, and the highest open-loop rate under P99 < 50 ms. One run, side by side.

    .venv/bin/python benchmarks/scaleout.py                      # this machine: workers 1 and 2
    python3 benchmarks/scaleout.py --gpu --out $OUT              # the 16-core GPU machine

``--gpu`` means the GPU machine's 16 cores (workers 1, 2, 4, 8; recsys runs on CPU); the GPU itself
is measured by ``benchmarks/gpu.py``. Both run there in one call: ``benchmarks/gpu.sh``.

Servers are started with ``python -m torchwire`` (no install needed), one configuration at a
time, the load generator (``torchwire bench``'s, several processes) on the same machine. Server
CPU per request is the CPU time of the whole process tree (supervisor and workers) over the
requests answered in a closed-loop run. Writes ``scaleout.json`` and ``scaleout.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import ROOT, best_rate, closed, console, load, machine, torchwire

from torchwire.bench import run_load
from torchwire.repository import ensure_demo_repository


def separate(repository: Path, count: int, procs: int, concurrency: int) -> dict[str, Any]:
    """``count`` separate one-process servers, each loaded by its own share of the load."""
    with ExitStack() as stack:
        targets = [stack.enter_context(torchwire(repository, 1, "recsys"))[0] for _ in range(count)]
        share = max(1, procs // count)
        configs = [load(t, "recsys", concurrency=concurrency // count) for t in targets]
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            results = list(pool.map(lambda c: run_load(c, share, progress=False), configs))
    return {
        "qps": round(sum(r.qps for r in results), 1),
        "p99_ms_worst": max(r.summary()["p99_ms"] for r in results),
        "errors": sum(r.error_count for r in results),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    demo = ensure_demo_repository(Path(tempfile.gettempdir()) / "torchwire-bench-cache")
    results: dict[str, Any] = {
        "machine": machine(args),
        "recsys": {},
    }
    for workers in args.workers:
        console.print(f"recsys, --workers {workers} ...")
        with torchwire(demo, workers, "recsys") as (target, process):
            row = {
                "closed": closed(
                    load(target, "recsys", concurrency=args.concurrency), args.load_procs, process
                )
            }
            if workers in args.sweep_workers:
                row["sweep"] = best_rate(
                    load(target, "recsys", duration_s=args.sweep_s), args.load_procs,
                    args.sweep_start,
                )  # fmt: skip
        results["recsys"][str(workers)] = row
        save(args.out, results)
    if args.separate:
        console.print(f"recsys, {args.separate} separate processes ...")
        results["separate"] = {
            "count": args.separate,
            **separate(demo, args.separate, args.load_procs, args.concurrency),
        }
    return results


def save(out: Path, results: dict[str, Any]) -> None:
    """Write what is measured so far (a run cut short by a time limit still reports)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout.json").write_text(json.dumps(results, indent=2))
    (out / "scaleout.md").write_text(markdown(results))


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# torchwire --workers: scale-out",
        "",
        f"{m['when']}, {m['cpus']} cores, GPU {m['gpu'] or 'none'}, Python {m['python']}, torch "
        f"{m['torch']}; load generator on the same host ({m['load_procs']} processes, "
        f"{m['concurrency']} callers closed loop, raw_inputs). Command: "
        "`benchmarks/scaleout.py`.",
        "",
        "## recsys, unary Predict",
        "",
        "| workers | closed-loop QPS | P50 ms | P99 ms | server CPU us/request (upper) "
        "| QPS at P99<50ms (open loop) | its P99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workers, row in r["recsys"].items():
        c, s = row["closed"], row.get("sweep")
        rate = f"{s['qps']:,.0f} | {s['p99_ms']}" if s else " | "
        lines.append(
            f"| {workers} | {c['qps']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} "
            f"| {c.get('server_cpu_us_per_request_upper', '')} "
            f"| {rate} |"
        )
    if "separate" in r:
        sep = r["separate"]
        lines.append(
            f"\n{sep['count']} separate one-process servers, each with its share of the load: "
            f"{sep['qps']:,.0f} QPS in all (worst P99 {sep['p99_ms_worst']:.2f} ms, "
            f"{sep['errors']} errors)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--gpu", action="store_true", help="the 16-core GPU machine's counts")
    parser.add_argument("--workers", type=ints, help="worker counts for recsys")
    parser.add_argument("--sweep-workers", type=ints, help="counts that also get a rate sweep")
    parser.add_argument("--separate", type=int, help="also N separate processes (0: none)")
    parser.add_argument("--load-procs", type=int, help="load generator processes")
    parser.add_argument("--concurrency", type=int, default=128, help="closed-loop callers")
    parser.add_argument("--sweep-s", type=float, default=3.0, help="seconds per sweep step")
    parser.add_argument("--sweep-start", type=float, help="first open-loop rate")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.gpu:
        args.workers = args.workers or [1, 2, 4, 8]
        args.sweep_workers = args.sweep_workers or [8]
        args.separate = 4 if args.separate is None else args.separate
        args.load_procs = args.load_procs or 6
        args.sweep_start = args.sweep_start or 4000.0
    else:
        args.workers = args.workers or [1, 2]
        args.sweep_workers = args.sweep_workers or args.workers
        args.load_procs = args.load_procs or 1
        args.concurrency = min(args.concurrency, 64)
        args.sweep_start = args.sweep_start or 500.0
    results = run(args)
    save(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
