"""Hot reload under constant load: failed requests (must be 0), P99 in reload windows vs. steady.

    .venv/bin/python benchmarks/reload.py [--reloads 10] [--out benchmarks/results]

For recsys and resnet18 in turn: ``torchwire serve`` on a copy of the demo repository, a constant
open-loop load from ``torchwire bench``'s load generator, and every few seconds a new
``model.pt`` (weights scaled by 1.01, alternating with the original) renamed into place. A second
of the run is "in a reload window" from the rename until 2 s after it (settle time, load and
warm-up, swap, drain of the old version).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from common import ROOT, TORCHWIRE
from hdrh.histogram import HdrHistogram

from torchwire.bench import LoadConfig, RunResult, run_load
from torchwire.bench.stats import new_histogram, summarize
from torchwire.repository import ensure_demo_repository

WINDOW_S = 2.0
PLANS = {  # model: (rate per second, shape, seconds)
    "recsys": (1000.0, (256,), 30.0),
    "resnet18": (15.0, (3, 224, 224), 40.0),
}


def perturbed(path: Path) -> bytes:
    module = torch.jit.load(str(path))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1.01)
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def scrape(port: int, name: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def merged(result: RunResult, seconds: list[int]) -> HdrHistogram:
    histogram = new_histogram()
    for index in seconds:
        if index < len(result.seconds) and result.seconds[index].ok:
            histogram.add(result.seconds[index].histogram)
    return histogram


def run_model(model: str, reloads: int, demo: Path) -> dict[str, Any]:
    rate, shape, duration = PLANS[model]
    workdir = Path(tempfile.mkdtemp(prefix="reload-"))
    shutil.copytree(demo / model, workdir / model)
    path = workdir / model / "1" / "model.pt"
    variants = [perturbed(path), path.read_bytes()]
    server = subprocess.Popen(
        [TORCHWIRE, "serve", "--repository", str(workdir), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--http-port", "0", "--metrics-host", "127.0.0.1",
         "--watch-interval-s", "0.2",
         "--watch-settle-s", "0.3", "--log-level", "info"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert server.stderr is not None
        for line in server.stderr:
            lines.append(line)
            if "metrics: http://" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines)
        port = int(re.findall(r"torchwire serving on [^ ]+:(\d+)", "".join(lines))[0])
        metrics_port = int(re.findall(r"metrics: http://[^:]+:(\d+)/", "".join(lines))[0])
        config = LoadConfig(
            target=f"127.0.0.1:{port}", model=model, shape=shape, rate=rate, concurrency=0,
            duration_s=duration, warmup_s=2.0, timeout_s=30.0, channels=2,
        )  # fmt: skip
        outcome: dict[str, RunResult] = {}
        loader = threading.Thread(target=lambda: outcome.update(r=run_load(config, progress=False)))
        loader.start()
        time.sleep(config.warmup_s + 0.5)
        started = time.monotonic() - 0.5
        spacing = (duration - WINDOW_S - 1) / reloads
        moments = []
        for index in range(reloads):
            moments.append(time.monotonic() - started)
            staging = path.with_name(".model.pt.tmp")
            staging.write_bytes(variants[index % 2])
            os.replace(staging, path)
            time.sleep(spacing)
        loader.join()
        result = outcome["r"]
        loaded_ok = scrape(metrics_port, "torchwire_model_loads_total", {"outcome": "ok"})
        loaded_failed = scrape(metrics_port, "torchwire_model_loads_total", {"outcome": "failed"})
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)
    in_window = sorted(
        {int(m + dt) for m in moments for dt in (0.0, WINDOW_S / 2, WINDOW_S) if m + dt < duration}
    )
    steady = [s for s in range(len(result.seconds)) if s not in in_window]
    return {
        "model": model,
        "rate": rate,
        "reloads": reloads,
        "swaps_loaded": int(loaded_ok) - 1,
        "loads_failed": int(loaded_failed),
        "requests": result.ok + result.error_count,
        "failed_requests": result.error_count,
        "errors": dict(result.errors),
        "qps": round(result.qps, 1),
        "p99_ms_reload_windows": summarize(merged(result, in_window))["p99_ms"],
        "p99_ms_steady": summarize(merged(result, steady))["p99_ms"],
        "p50_ms_overall": result.summary()["p50_ms"],
        "p99_ms_overall": result.summary()["p99_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    rows = [run_model(model, args.reloads, demo) for model in PLANS]
    table = [
        "| model | offered/s | requests | failed | reloads | swaps loaded | P99 ms steady "
        "| P99 ms reload windows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['rate']:g} | {r['requests']:,} | {r['failed_requests']} "
            f"| {r['reloads']} | {r['swaps_loaded']} | {r['p99_ms_steady']:.2f} "
            f"| {r['p99_ms_reload_windows']:.2f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reload.json").write_text(json.dumps(rows, indent=2))
    (args.out / "reload.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    sys.exit(1 if any(r["failed_requests"] for r in rows) else 0)


if __name__ == "__main__":
    main()
