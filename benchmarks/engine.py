"""Engine mode (``--engine on``) against one process and whole-server workers, in one run.

    .venv/bin/python benchmarks/engine.py [--seconds 8] [--device cpu|cuda] [--out DIR]

1. resnet18, one image per request, closed loop (``--callers``): images/s and the mean batch of
   one process, of ``--workers 2`` whole servers, and of ``--workers 2 --engine on`` (with the
   engine's default of one inference thread per worker, and with one; one process also with
   ``--malloc-keep-mb 0``, and the server's minor page faults per image), each round against the
   in-process best of that round (the model called directly at batch 1/2/4/8, to 64 on a GPU:
   by one caller on every core, and by one single-threaded caller per core).
   ``--device cuda`` (the GPU machine, via ``ENGINE=1 bash benchmarks/gpu.sh``) runs it on the GPU
   with N = 1, 2, 4, 8 engine workers, a copy of the demo's resnet18 configured for it.
2. recsys: server CPU per answer (every process of the server) at 800 requests/s open loop, one
   item each, whole-server ``--workers 2`` against ``--workers 2 --engine on``, two rounds.
3. One copy: the process tree's memory (PSS, summed over every process) of ``--workers 4``
   serving a small model, then a small model and a 512 MB one (8 x Linear(4096, 4096)), whole
   servers against an engine: the growth over the model's size.

Writes ``engine.json`` and ``engine.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import torch
from common import (
    closed,
    console,
    free_port,
    load,
    minor_faults,
    run_with_server_cpu,
    torchwire,
)
from torch import nn

from torchwire.repository import ensure_demo_repository
from torchwire.runtime.cost import DEFAULT_TORCH_THREADS

MB = 1 << 20


def in_process_best(path: Path, device: str, seconds: float) -> dict[str, Any]:
    """The model called directly, at each batch size: on a GPU by one caller; on a CPU also by
    one caller per core with one intra-op thread each (what ``[instances] count`` does, and on
    2 cores the faster of the two), so that the ceiling is the best the cores can do."""
    module = torch.jit.load(str(path), map_location=device).eval()
    shapes = [(1, 0)] + ([(os.cpu_count() or 1, 1)] if device == "cpu" else [])
    batches = (1, 2, 4, 8, 16, 32, 64) if device == "cuda" else (1, 2, 4, 8)
    rows = {}
    for callers, threads in shapes:
        for batch in batches:
            key = f"{batch}" if callers == 1 else f"{batch} x{callers}"
            rows[key] = round(_call_rate(module, device, batch, callers, threads, seconds), 1)
    best = max(rows, key=lambda b: rows[b])
    return {"by_batch": rows, "best_batch": best, "best": rows[best]}


def _call_rate(
    module: Any, device: str, batch: int, callers: int, threads: int, seconds: float
) -> float:
    """Items per second of ``callers`` threads calling ``module`` on ``batch`` items (``threads``
    intra-op threads each; 0: torch's default)."""
    done = [0] * callers
    start = threading.Barrier(callers + 1)

    def call(index: int) -> None:
        # This thread's own OpenMP team; set each time, as a thread takes the last value set
        # by any thread when it starts (runtime/cost.py).
        torch.set_num_threads(threads or DEFAULT_TORCH_THREADS)
        x = torch.randn(batch, 3, 224, 224, device=device)
        with torch.inference_mode():
            for _ in range(3):
                module(x)
            if device == "cuda":
                torch.cuda.synchronize()
            start.wait()
            until = time.perf_counter() + seconds
            while time.perf_counter() < until:
                module(x)
                done[index] += batch
            if device == "cuda":
                torch.cuda.synchronize()

    workers = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    return sum(done) / (time.perf_counter() - started)


def gpu_used_mb() -> float | None:
    """Memory in use on GPU 0 (every process), from NVML; None without it."""
    try:
        import pynvml

        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        return round(float(used) / MB)
    except Exception:
        return None


def scrape(port: int, name: str, model: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
    return sum(float(v) for labels, v in pattern.findall(text) if f'model="{model}"' in labels)


def resnet_repo(demo: Path, device: str, max_batch: int, count: int | None = None) -> Path:
    """A copy of the demo's resnet18 on ``device`` with ``max_batch``, and ``count`` inference
    threads where given."""
    root = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    shutil.copytree(demo / "resnet18", root / "resnet18")
    config = (root / "resnet18" / "config.toml").read_text()
    config = re.sub(r"max_batch_size = \d+", f"max_batch_size = {max_batch}", config)
    assert "[instances]" not in config  # the demo's config has none
    config += f'\n[instances]\ndevice = "{device}"\n' + (f"count = {count}\n" if count else "")
    (root / "resnet18" / "config.toml").write_text(config)
    return root


def tree_faults(process: psutil.Process) -> int:
    """Minor page faults so far of ``process`` and its children."""
    total = 0
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(OSError):
            total += minor_faults(each.pid)
    return total


def images(
    target: str, port: int, process: psutil.Process, callers: int, seconds: float
) -> dict[str, Any]:
    before = (
        scrape(port, "torchwire_batch_size_sum", "resnet18"),
        scrape(port, "torchwire_batch_size_count", "resnet18"),
        tree_faults(process),
    )
    summary = closed(
        load(target, "resnet18", concurrency=callers, duration_s=seconds, warmup_s=2.0,
             timeout_s=30.0, channels=8, protocol="v2", input_name="image"),
        2, None,
    )  # fmt: skip
    items = scrape(port, "torchwire_batch_size_sum", "resnet18") - before[0]
    calls = scrape(port, "torchwire_batch_size_count", "resnet18") - before[1]
    faults = tree_faults(process) - before[2]
    return {
        "images_per_s": summary["qps"],
        "faults_per_image": round(faults / items) if items else None,
        "p99_ms": summary.get("p99_ms"),
        "errors": summary.get("errors", 0),
        "mean_batch": round(items / calls, 2) if calls else None,
        "client_cpu_cores": summary["client_cpu_cores"],
    }


def part_images(args: argparse.Namespace, demo: Path) -> dict[str, Any]:
    """Each round: the in-process ceiling, then each server shape, in turn (the machine's noise
    shows in the spread; each row's ratio is to its own round's ceiling and to the highest)."""
    device = args.device
    model_file = demo / "resnet18" / "1" / "model.pt"
    max_batch = 64 if device == "cuda" else 4  # 4: the demo's, best here
    # (name, workers, --engine, [instances] count (None: the config's, unset), more flags)
    Shape = tuple[str, int, str, int | None, tuple[str, ...]]
    shapes: list[Shape] = [("one process", 1, "off", None, ())]
    if device == "cuda":
        shapes += [(f"engine, {n} workers", n, "on", None, ()) for n in (1, 2, 4, 8)]
        shapes.append(("whole servers, 4 workers", 4, "off", None, ()))
    else:
        cores = os.cpu_count() or 1
        shapes += [
            (f"one process, count {cores}", 1, "off", cores, ()),
            (f"one process, count {cores}, --malloc-keep-mb 0", 1, "off", cores,
             ("--malloc-keep-mb", "0")),
            ("whole servers, 2 workers", 2, "off", None, ()),
            ("engine, 2 workers (count unset: 2)", 2, "on", None, ()),
            ("engine, 2 workers, count 1", 2, "on", 1, ()),
        ]  # fmt: skip
    repos = {count: resnet_repo(demo, device, max_batch, count) for _, _, _, count, _ in shapes}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in shapes}
    ceilings = []
    for _ in range(args.rounds):
        console.print("resnet18 in process ...")
        ceiling = in_process_best(model_file, device, args.seconds / 4)
        ceilings.append(ceiling)
        for name, workers, engine, count, flags in shapes:
            console.print(f"resnet18, {name} ...")
            port = free_port()
            extra = ["--engine", engine, "--metrics-port", str(port), *flags]
            with torchwire(repos[count], workers, "resnet18", extra) as (target, process):
                row = images(target, port, process, args.callers, args.seconds)
                if device == "cuda":
                    row["gpu_used_mb"] = gpu_used_mb()
            row["vs_round"] = round(row["images_per_s"] / ceiling["best"], 3)
            runs[name].append(row)
    best = max(c["best"] for c in ceilings)
    for rows in runs.values():
        for row in rows:
            row["vs_in_process"] = round(row["images_per_s"] / best, 3)
    for repo in repos.values():
        shutil.rmtree(repo, ignore_errors=True)
    return {"in_process": ceilings, "best": best, "servers": runs}


def part_recsys_cpu(args: argparse.Namespace, demo: Path) -> dict[str, Any]:
    rows: dict[str, list[float]] = {"whole servers": [], "engine": []}
    for _ in range(2):
        for name, engine in (("whole servers", "off"), ("engine", "on")):
            console.print(f"recsys CPU per answer, {name} ...")
            with torchwire(demo, 2, "recsys", ["--engine", engine]) as (target, process):
                config = load(target, "recsys", rate=800.0, duration_s=args.seconds)
                rows[name].append(round(run_with_server_cpu(config, 1, process)[1] * 1e6, 1))
    rows_out: dict[str, Any] = dict(rows)
    rows_out["ratio"] = [
        round(e / w, 2) for e, w in zip(rows["engine"], rows["whole servers"], strict=True)
    ]
    return rows_out


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(4096, 4096) for _ in range(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def write_model(root: Path, name: str, module: nn.Module, width: int) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.toml").write_text(
        f'[[inputs]]\nname = "x"\nshape = [{width}]\n[batching]\nmax_batch_size = 4\n'
        "[instances]\nthreads = 1\n"
    )
    torch.jit.script(module.eval()).save(str(root / name / "1" / "model.pt"))


def tree_pss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    big = Big()
    size = sum(p.numel() * p.element_size() for p in big.parameters())
    small_root = Path(tempfile.mkdtemp(prefix="engine-mem-"))
    big_root = Path(tempfile.mkdtemp(prefix="engine-mem-"))
    for root in (small_root, big_root):
        write_model(root, "recsys", nn.Linear(256, 1), 256)
    write_model(big_root, "big", big, 4096)
    rows: dict[str, Any] = {"model_mb": round(size / MB, 1)}
    for name, engine in (("whole servers", "off"), ("engine", "on")):
        pss = {}
        for label, root in (("without", small_root), ("with", big_root)):
            console.print(f"memory, {name}, {label} the 512 MB model ...")
            with torchwire(root, 4, "recsys", ["--engine", engine]) as (_, process):
                time.sleep(2.0)  # let the warm-ups' temporaries go back
                pss[label] = tree_pss(process)
        growth = pss["with"] - pss["without"]
        rows[name] = {
            "pss_without_mb": round(pss["without"] / MB),
            "pss_with_mb": round(pss["with"] / MB),
            "growth_mb": round(growth / MB),
            "growth_vs_model": round(growth / size, 2),
        }
    shutil.rmtree(small_root, ignore_errors=True)
    shutil.rmtree(big_root, ignore_errors=True)
    return rows


def report(results: dict[str, Any]) -> str:
    lines = [f"# Engine mode ({results['when']}, device {results['device']})", ""]
    imgs = results.get("images")
    if imgs:
        lines += ["## resnet18, one image per request (images/s)", ""]
        for round_, ceiling in enumerate(imgs["in_process"], 1):
            lines.append(
                f"- In process, round {round_}: best {ceiling['best']} at batch "
                f'{ceiling["best_batch"]} ({ceiling["by_batch"]}; "x2": two callers, one '
                "intra-op thread each)."
            )
        lines += [
            "",
            "One row per round; ratios to that round's in-process best, and to the highest, "
            f"{imgs['best']}.",
            "",
            "| server | images/s | vs round | vs highest | mean batch | P99 ms | errors | "
            "faults/image | GPU MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for name, row in ((n, r) for n, rows in imgs["servers"].items() for r in rows):
            lines.append(
                f"| {name} | {row['images_per_s']} | {row['vs_round']}x | "
                f"{row['vs_in_process']}x | "
                f"{row['mean_batch']} | {row['p99_ms']} | {row['errors']} | "
                f"{row.get('faults_per_image')} | {row.get('gpu_used_mb', '')} |"
            )
        lines.append("")
    cpu = results.get("recsys_cpu")
    if cpu:
        lines += [
            "## recsys, server CPU per answer at 800/s (us; every process of the server)", "",
            f"- whole servers, 2 workers: {cpu['whole servers']}",
            f"- engine, 2 workers: {cpu['engine']}",
            f"- engine / whole servers: {cpu['ratio']}", "",
        ]  # fmt: skip
    memory = results.get("memory")
    if memory:
        lines += [
            f"## One copy: --workers 4, adding a {memory['model_mb']} MB model (PSS, summed)", "",
            "| | without (MB) | with (MB) | growth (MB) | growth / model |",
            "|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        for name in ("whole servers", "engine"):
            row = memory[name]
            lines.append(
                f"| {name} | {row['pss_without_mb']} | {row['pss_with_mb']} | "
                f"{row['growth_mb']} | {row['growth_vs_model']}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parts", default="images,recsys,memory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    parts = args.parts.split(",")
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": args.device,
        "callers": args.callers,
        "seconds": args.seconds,
    }
    if "images" in parts:
        results["images"] = part_images(args, demo)
    if "recsys" in parts:
        results["recsys_cpu"] = part_recsys_cpu(args, demo)
    if "memory" in parts:
        results["memory"] = part_memory(args)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"-{args.device}"
    (args.out / f"engine{suffix}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"engine{suffix}.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
