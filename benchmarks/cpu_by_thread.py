"""Where a server's CPU goes per answer, by thread, for one load: the figure issue 16 is about.

    .venv/bin/python benchmarks/cpu_by_thread.py [--server echo|echo-sync|torchwire] [--load stream]
        [--rate 2000] [--concurrency 0] [--seconds 4] [--rounds 2] [--old-src DIR]

Starts the server as ``benchmarks/run.py`` does (the demo repository), runs the load ``--rounds``
times, and prints per round: server CPU per answer (every process, /proc), the same split by
thread (named as py-spy names them, when it is installed), voluntary and involuntary context
switches per answer, P50 and QPS. ``--old-src DIR`` (e.g. a ``git worktree`` of an older commit's
``src``) runs that torchwire instead, then this one, in turns: old and new side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
from run import load, server
from scaleout import run_with_server_cpu

from torchwire.repository import ensure_demo_repository

LOADS = ("stream", "unary")


def thread_cpu_s(process: psutil.Process) -> Counter[int]:
    """CPU seconds (user + system) of each thread of ``process``, by thread id."""
    return Counter({t.id: t.user_time + t.system_time for t in process.threads()})


def thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from ``py-spy dump`` (empty without py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    return {int(m[1]): m[2] for m in re.finditer(r'Thread (\d+) \([^)]*\): "([^"]*)"', dump)}


def measure(kind: str, args: argparse.Namespace, demo: Path) -> None:
    with server(kind, demo) as (target, process):
        stream = args.load == "stream"
        config = load(
            target, "recsys", stream=stream, channels=4 if stream else 2,
            duration_s=args.seconds, rate=0.0 if args.concurrency else args.rate,
            concurrency=args.concurrency,
        )  # fmt: skip
        for _ in range(args.rounds):
            switches, threads = process.num_ctx_switches(), thread_cpu_s(process)
            result, cpu_s = run_with_server_cpu(config, 1, process)
            after, spent = process.num_ctx_switches(), thread_cpu_s(process) - threads
            answers = max(1, result.ok * (1 + config.warmup_s / config.duration_s))
            names = thread_names(process.pid)
            by_thread: Counter[str] = Counter()
            for tid, seconds in spent.items():
                by_thread[names.get(tid, "native")] += seconds
            split = ", ".join(
                f"{name} {seconds / answers * 1e6:.0f}" for name, seconds in by_thread.most_common()
            )
            voluntary = (after.voluntary - switches.voluntary) / answers
            involuntary = (after.involuntary - switches.involuntary) / answers
            print(
                f"{kind} {args.load}: {cpu_s * 1e6:.0f} us CPU per answer ({split}); context "
                f"switches per answer {voluntary:.2f} voluntary, {involuntary:.2f} involuntary; "
                f"P50 {result.summary().get('p50_ms')} ms, {result.qps:,.0f} QPS",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("echo", "echo-sync", "torchwire"), default="torchwire")
    parser.add_argument("--load", choices=LOADS, default="stream")
    parser.add_argument("--rate", type=float, default=2000.0, help="answers/s, open loop")
    parser.add_argument("--concurrency", type=int, default=0, help="closed loop instead")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old-src", type=Path, help="an older torchwire's src, run in turns")
    args = parser.parse_args()
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    if args.old_src is None:
        measure(args.server, args, demo)
        return
    for _ in range(args.rounds):
        os.environ["PYTHONPATH"] = str(args.old_src.resolve())
        print("old:", flush=True)
        measure("torchwire", argparse.Namespace(**{**vars(args), "rounds": 1}), demo)
        del os.environ["PYTHONPATH"]
        print("new:", flush=True)
        measure("torchwire", argparse.Namespace(**{**vars(args), "rounds": 1}), demo)


if __name__ == "__main__":
    main()
