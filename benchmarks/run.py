"""All of torchwire's benchmarks, side by side in one run, on this machine.

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results]

Reference points, each started here on a free port and measured with the same load generator
(``torchwire bench``'s, one load process, the founding proto's ``inputs`` floats unless said):
- the in-process ceiling: the model called directly, at each batch size, in this process;
- echo: a bare grpc.aio server of the founding proto that answers without a model (gRPC ceiling);
- seed: the founding document's server as written (``benchmarks/seed_baseline/``);
- torchwire: ``torchwire serve`` on the demo repository.

Writes ``results.json``, ``results.md`` (the tables, with the targets of issue 4 checked) and
``results.png``. Servers run one at a time so that they never share the two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from common import ROOT, TORCHWIRE, free_port, health_serving, run_with_server_cpu
from rich.console import Console

from torchwire.bench import LoadConfig, run_load, sweep
from torchwire.bench.report import sweep_summary
from torchwire.client import Client
from torchwire.repository import ensure_demo_repository

PYTHON = sys.executable
console = Console(stderr=True)


@contextmanager
def server(
    kind: str, demo: Path, model: str = "recsys", http_port: int = 0
) -> Iterator[tuple[str, psutil.Process]]:
    """Start one server of ``kind`` (echo, echo-sync, seed, torchwire, torchwire-aio; the last
    two with their REST front-end on ``http_port`` if not 0); yield its gRPC target and
    process."""
    port = free_port()
    shape = "256" if model == "recsys" else "3,224,224"
    commands = {
        "echo": [PYTHON, "benchmarks/servers/echo.py", "--port", str(port)],
        "echo-sync": [PYTHON, "benchmarks/servers/echo.py", "--port", str(port), "--sync"],
        "seed": [
            PYTHON, "benchmarks/seed_baseline/server.py", "--port", str(port),
            "--model", str(demo / model / "1" / "model.pt"), "--shape", shape,
        ],
        "torchwire": [
            TORCHWIRE, "serve", "--repository", str(demo), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", "0", "--http-port", str(http_port),
            "--log-level", "warning",
        ],
    }  # fmt: skip
    # torchwire on its grpc.aio front end (the default is the native one).
    commands["torchwire-aio"] = [*commands["torchwire"], "--grpc-frontend", "aio"]
    process = subprocess.Popen(commands[kind], cwd=ROOT, stdout=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, timeout=5, raw=False, retries=0) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.wait_ready(timeout=2)
                    dims = (1, 256) if model == "recsys" else (1, 3, 224, 224)
                    client.predict(model, np.zeros(dims, np.float32), timeout=30)
                    if not kind.startswith("torchwire") or health_serving(target):
                        break  # torchwire: every model loaded (wait_serving says why)
                except Exception:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{kind} server did not start")
                time.sleep(0.2)
        yield target, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def load(target: str, model: str, **kwargs: Any) -> LoadConfig:
    shape = (256,) if model == "recsys" else (3, 224, 224)
    base = {"duration_s": 5.0, "warmup_s": 1.0, "channels": 2, "raw": False}
    return LoadConfig(target=target, model=model, shape=shape, **{**base, **kwargs})


def closed(config: LoadConfig) -> dict[str, Any]:
    result = run_load(config, progress=False)
    summary = result.summary()
    summary["client_cpu_cores"] = round(sum(result.cpu_per_proc), 2)
    return summary


def cpu_per_answer(config: LoadConfig, process: psutil.Process) -> float:
    """Server CPU (user + system, every process of it) per answer, in us, over an open-loop
    run (its warm-up's answers counted too)."""
    return round(run_with_server_cpu(config, 1, process)[1] * 1e6, 1)


def best_rate(config: LoadConfig, start: float) -> dict[str, Any]:
    steps = sweep(config, slo_ms=50.0, start_rate=start, progress=False, console=console)
    return sweep_summary(steps)


def in_process(demo: Path, model: str, batches: list[int], seconds: float) -> dict[str, Any]:
    """Items/s and per-call latency of the model called directly, under inference_mode."""
    module = torch.jit.load(str(demo / model / "1" / "model.pt")).eval()
    shape = (256,) if model == "recsys" else (3, 224, 224)
    rows = {}
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, *shape)
            for _ in range(3):
                module(x)
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                module(x)
                calls += 1
            elapsed = time.perf_counter() - started
            rows[batch] = {
                "items_per_s": round(calls * batch / elapsed, 1),
                "ms_per_call": round(elapsed / calls * 1000, 4),
            }
    best = max(rows, key=lambda b: rows[b]["items_per_s"])
    return {"by_batch": rows, "best_batch": best, "best_items_per_s": rows[best]["items_per_s"]}


def run(quick: bool) -> dict[str, Any]:
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    seconds = 2.0 if quick else 5.0
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    }
    console.print("in-process ceilings ...")
    results["in_process"] = {
        "recsys": in_process(demo, "recsys", [1, 8, 32, 64, 128], 1.0),
        "resnet18": in_process(demo, "resnet18", [1, 2, 4, 8, 16], 3.0 if not quick else 1.5),
    }
    concurrencies = [1, 8, 64]
    unary: dict[str, Any] = {}
    for kind in ("echo", "seed", "torchwire", "torchwire-aio"):
        with server(kind, demo) as (target, process):
            console.print(f"recsys unary, {kind} ...")
            rows = {
                f"c{c}": closed(load(target, "recsys", concurrency=c, duration_s=seconds))
                for c in concurrencies
            }
            rows["sweep"] = best_rate(load(target, "recsys", duration_s=seconds), 500.0)
            rows["cpu_us"] = cpu_per_answer(
                load(target, "recsys", rate=800.0, duration_s=seconds), process
            )
            if kind == "torchwire":
                rows["c64_raw"] = closed(
                    load(target, "recsys", concurrency=64, duration_s=seconds, raw=True)
                )
            unary[kind] = rows
    results["recsys_unary"] = unary

    stream: dict[str, Any] = {}
    for kind in ("echo", "torchwire", "torchwire-aio"):
        with server(kind, demo) as (target, process):
            console.print(f"recsys PredictStream, {kind} ...")
            config = load(target, "recsys", stream=True, channels=4, duration_s=seconds)
            stream[kind] = {
                "c8": closed(dataclasses.replace(config, concurrency=8)),
                "sweep": best_rate(config, 1000.0),
                "cpu_us": cpu_per_answer(dataclasses.replace(config, rate=2000.0), process),
            }
    results["recsys_stream"] = stream

    images: dict[str, Any] = {}
    for kind in ("seed", "torchwire"):
        with server(kind, demo, "resnet18") as (target, _):
            console.print(f"resnet18, {kind} ...")
            raw = kind == "torchwire"
            levels = [8, 32] if kind == "torchwire" else [8]
            images[kind] = {
                f"c{c}": closed(
                    load(target, "resnet18", concurrency=c, raw=raw, duration_s=2 * seconds,
                         warmup_s=2.0, timeout_s=30.0)
                )
                for c in levels
            }  # fmt: skip
    results["resnet18"] = images
    results["targets"] = targets(results)
    return results


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    unary, stream, images = r["recsys_unary"], r["recsys_stream"], r["resnet18"]
    ceiling_img = r["in_process"]["resnet18"]["best_items_per_s"]
    batch1_ms = r["in_process"]["recsys"]["by_batch"][1]["ms_per_call"]
    p50_bound = unary["echo"]["c1"]["p50_ms"] + batch1_ms + 0.3
    best_images = max(row["qps"] for row in images["torchwire"].values())
    native, aio = unary["torchwire"], unary["torchwire-aio"]
    checks = [
        # The native front end (issue 28): against the bare grpc.aio echo and torchwire on aio.
        ("recsys unary QPS at P99<50ms >= 1.3x echo",
         native["sweep"]["qps"] / max(1.0, unary["echo"]["sweep"]["qps"]), 1.3),
        ("server CPU per unary answer <= 1.0x echo's (echo / torchwire)",
         unary["echo"]["cpu_us"] / native["cpu_us"], 1.0),
        ("server CPU per unary answer <= 0.6x torchwire on aio's (aio / native)",
         aio["cpu_us"] / native["cpu_us"], round(1 / 0.6, 3)),
        ("stream answers/s at P99<50ms >= torchwire on aio's",
         stream["torchwire"]["sweep"]["qps"] / max(1.0, stream["torchwire-aio"]["sweep"]["qps"]),
         1.0),
        ("server CPU per stream answer <= torchwire on aio's (aio / native)",
         stream["torchwire-aio"]["cpu_us"] / stream["torchwire"]["cpu_us"], 1.0),
        ("recsys stream answers/s at P99<50ms >= 0.8x echo stream",
         stream["torchwire"]["sweep"]["qps"] / max(1.0, stream["echo"]["sweep"]["qps"]), 0.8),
        ("resnet18 images/s >= 0.9x in-process best batch", best_images / ceiling_img, 0.9),
        # Server CPU per answer (issue 16), as echo's over torchwire's: <= 1.5x echo is >= 0.67.
        ("server CPU per unary answer <= 1.5x echo's (echo / torchwire)",
         unary["echo"]["cpu_us"] / unary["torchwire"]["cpu_us"], round(1 / 1.5, 3)),
        ("server CPU per stream answer <= 1.6x echo's (echo / torchwire)",
         stream["echo"]["cpu_us"] / stream["torchwire"]["cpu_us"], round(1 / 1.6, 3)),
    ]  # fmt: skip
    rows = [
        {"target": name, "value": round(value, 3), "needed": needed, "met": value >= needed}
        for name, value, needed in checks
    ]
    p50 = unary["torchwire"]["c1"]["p50_ms"]
    rows.append(
        {
            "target": "recsys P50 at c=1 <= echo P50 + in-process batch-1 + 0.3 ms",
            "value": p50,
            "needed": round(p50_bound, 3),
            "met": p50 <= p50_bound,
        }
    )
    return rows


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# torchwire benchmarks",
        "",
        f"{m['when']}, {m['cpus']} cores, Python {m['python']}, torch {m['torch']}; client and "
        "server on the same host; one load process; `inputs` floats (the founding proto) unless "
        "marked raw. Command: `.venv/bin/python benchmarks/run.py`.",
        "",
        "## Targets (issues 4, 16 and 28)",
        "",
        "| target | measured | needed | met |",
        "|---|---:|---:|:---:|",
    ]
    lines += [
        f"| {t['target']} | {t['value']} | {t['needed']} | {'yes' if t['met'] else 'NO'} |"
        for t in r["targets"]
    ]
    lines += [
        "",
        "## recsys, unary Predict",
        "",
        "| server | QPS at P99<50ms | c=1 QPS | c=1 P50 ms | c=1 P99 ms | c=8 QPS | c=8 P50 ms "
        "| c=8 P99 ms | c=64 QPS | c=64 P50 ms | c=64 P99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in r["recsys_unary"].items():
        cells = [f"{row['sweep']['qps']:,.0f}"]
        for c in ("c1", "c8", "c64"):
            cells += [f"{row[c]['qps']:,.0f}", f"{row[c]['p50_ms']:.2f}", f"{row[c]['p99_ms']:.2f}"]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    raw = r["recsys_unary"]["torchwire"]["c64_raw"]
    lines.append(
        f"| torchwire, raw_inputs | | | | | | | | {raw['qps']:,.0f} | {raw['p50_ms']:.2f} "
        f"| {raw['p99_ms']:.2f} |"
    )
    lines += [
        "",
        "## recsys, PredictStream (answers/s)",
        "",
        "| server | answers/s at P99<50ms | c=8 streams answers/s | c=8 P50 ms | c=8 P99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, row in r["recsys_stream"].items():
        c8 = row["c8"]
        lines.append(
            f"| {kind} | {row['sweep']['qps']:,.0f} | {c8['qps']:,.0f} | {c8['p50_ms']:.2f} "
            f"| {c8['p99_ms']:.2f} |"
        )
    lines.append(
        "\nThe seed server answers a stream once per 32 requests, so it has no per-request "
        "stream latency to compare."
    )
    unary, stream = r["recsys_unary"], r["recsys_stream"]
    lines += [
        "",
        "## Server CPU per answer (us, every process of the server, from /proc)",
        "",
        "torchwire is the native front end (the default); torchwire-aio is `--grpc-frontend aio`.",
        "",
        "| | echo (grpc.aio) | seed | torchwire | torchwire-aio | torchwire vs echo "
        "| torchwire vs torchwire-aio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| unary Predict, 800 requests/s open loop | {unary['echo']['cpu_us']:,.0f} | "
        f"{unary['seed']['cpu_us']:,.0f} | {unary['torchwire']['cpu_us']:,.0f} | "
        f"{unary['torchwire-aio']['cpu_us']:,.0f} | "
        f"{unary['torchwire']['cpu_us'] / unary['echo']['cpu_us']:.2f}x | "
        f"{unary['torchwire']['cpu_us'] / unary['torchwire-aio']['cpu_us']:.2f}x |",
        f"| PredictStream, 4 streams, 2,000 answers/s | {stream['echo']['cpu_us']:,.0f} | | "
        f"{stream['torchwire']['cpu_us']:,.0f} | {stream['torchwire-aio']['cpu_us']:,.0f} | "
        f"{stream['torchwire']['cpu_us'] / stream['echo']['cpu_us']:.2f}x | "
        f"{stream['torchwire']['cpu_us'] / stream['torchwire-aio']['cpu_us']:.2f}x |",
    ]
    ceiling = r["in_process"]["resnet18"]
    lines += [
        "",
        "## resnet18, one image per request (images/s)",
        "",
        f"In-process best: {ceiling['best_items_per_s']:.1f} images/s at batch "
        f"{ceiling['best_batch']}.",
        "",
        "| server | concurrency | images/s | P50 ms | P99 ms | vs in-process best |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, rows in r["resnet18"].items():
        for level, row in rows.items():
            ratio = row["qps"] / ceiling["best_items_per_s"]
            lines.append(
                f"| {kind}{' (raw)' if kind == 'torchwire' else ''} | {level[1:]} | "
                f"{row['qps']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {ratio:.2f}x |"
            )
    lines += ["", "## In-process ceilings (model called directly)", ""]
    for model, data in r["in_process"].items():
        lines.append(f"**{model}**: " + ", ".join(
            f"batch {b}: {v['items_per_s']:,.0f} items/s ({v['ms_per_call']:.3f} ms/call)"
            for b, v in data["by_batch"].items()
        ))  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (qps, p99, imgs) = plt.subplots(1, 3, figsize=(15, 4.5))
    kinds = list(r["recsys_unary"])
    levels = ["c1", "c8", "c64", "sweep"]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        values = [r["recsys_unary"][kind][lv]["qps"] for lv in levels]
        qps.bar([x + i * width for x in range(len(levels))], values, width, label=kind)
        p99.bar(
            [x + i * width for x in range(3)],
            [r["recsys_unary"][kind][lv]["p99_ms"] for lv in levels[:3]],
            width,
            label=kind,
        )
    qps.set_xticks([x + width for x in range(len(levels))], ["c=1", "c=8", "c=64", "P99<50ms"])
    qps.set(title="recsys unary QPS", ylabel="QPS")
    qps.legend()
    p99.set_xticks([x + width for x in range(3)], ["c=1", "c=8", "c=64"])
    p99.set(title="recsys unary P99 (ms)", ylabel="ms")
    p99.legend()
    names, values = ["in-process best"], [r["in_process"]["resnet18"]["best_items_per_s"]]
    for kind, rows in r["resnet18"].items():
        for level, row in rows.items():
            names.append(f"{kind} {level}")
            values.append(row["qps"])
    imgs.bar(names, values, color=["grey"] + ["C0"] * (len(names) - 1))
    imgs.set(title="resnet18 images/s", ylabel="images/s")
    imgs.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results = run(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    plot(results, args.out / "results.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
