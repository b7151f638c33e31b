"""resnet18 on one GPU, side by side in one run. First the GPU path checked on the real device:
fp16 answering in the declared FP32, a request too big for the GPU refused alone while its
batchmates are answered, GPU memory in /metrics, and the memory given back after an unload. Then
the TorchScript file called in-process at each batch size (the ceiling), and torchwire in one
process (one and two instances) and with ``--workers``, fp32 and fp16. The seconds each stage
took are in the report.

    python3 benchmarks/gpu.py --out $OUT                 # a GPU machine: see benchmarks/gpu.sh
    .venv/bin/python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu   # the script, no GPU

The load generator (``torchwire bench``'s, several processes, raw tensors over the seed API, and
in one run over KServe V2 as tritonclient sends them) runs on the same machine. For each
torchwire run the server's own /metrics give the mean batch and the mean compute time per batch,
which say what bounds it. With ``--profile`` a py-spy profile of the
one-process server is written too (py-spy from .whl/). Writes ``gpu.json`` and ``gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import tritonclient.grpc as triton
from common import ROOT, closed, free_port, load, machine, torchwire
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from torch import nn

from torchwire.compat.torch_internals import jit_executor_settings, set_jit_executor
from torchwire.config import load_model_config
from torchwire.repository import ensure_demo_repository
from torchwire.runtime.model import LoadedModel

console = Console(stderr=True)


STAGES = ("checks", "device-failure", "in-process", "model-path", "jit", "runs")

# -- the in-process ceiling -----------------------------------------------------------------

MIXED = (32, 64)
"""Batch sizes drawn at random for the in-process run at changing sizes."""


def in_process(demo: Path, device: str, precision: str, batches: list[int], seconds: float) -> dict:
    """Images/s of the TorchScript file, host tensors in and out as a server must (pinned
    input, copied to the device and back each call), at each batch size; then at batch sizes
    that change every call (``MIXED``), as a server's batches do: TorchScript's profiling
    executor specialises its fused kernels by shape on a GPU, and a new size may cost a
    re-specialisation (the slowest call shows it)."""
    module = torch.jit.load(str(demo / "resnet18" / "1" / "model.pt")).eval().to(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    cuda = device.startswith("cuda")
    rows = {}
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype, enabled=bool(dtype)):
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224)
            x = x.pin_memory() if cuda else x
            for _ in range(3):
                module(x.to(device, non_blocking=True)).float().cpu()
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                module(x.to(device, non_blocking=True)).float().cpu()
                calls += 1
            rows[batch] = {
                "images_per_s": round(calls * batch / (time.perf_counter() - started), 1),
                "ms_per_batch": round((time.perf_counter() - started) / calls * 1000, 2),
            }
        sizes = np.random.default_rng(0).integers(MIXED[0], MIXED[1] + 1, 10_000).tolist()
        x = torch.randn(MIXED[1], 3, 224, 224)
        x = x.pin_memory() if cuda else x
        images, slowest, calls, started = 0, 0.0, 0, time.perf_counter()
        while time.perf_counter() - started < seconds and calls < len(sizes):
            call = time.perf_counter()
            module(x[: sizes[calls]].to(device, non_blocking=True)).float().cpu()
            slowest = max(slowest, time.perf_counter() - call)
            images, calls = images + sizes[calls], calls + 1
        mixed = {
            "images_per_s": round(images / (time.perf_counter() - started), 1),
            "ms_per_batch": round((time.perf_counter() - started) / calls * 1000, 2),
            "slowest_ms": round(slowest * 1000, 1),
            "sizes_seen": len(set(sizes[:calls])),
        }
    best = max(rows, key=lambda b: rows[b]["images_per_s"])
    return {
        "by_batch": rows, "best_batch": best, "best_images_per_s": rows[best]["images_per_s"],
        "mixed": mixed,
    }  # fmt: skip


JIT_SETTINGS: dict[str, Callable[[], None]] = {
    "default": lambda: None,
    "fusion strategy DYNAMIC 20": lambda: torch.jit.set_fusion_strategy([("DYNAMIC", 20)]),
    "fuser off": lambda: set_jit_executor(False, jit_executor_settings()[1]),
    "no executor optimisation": lambda: set_jit_executor(jit_executor_settings()[0], False),
}
"""TorchScript settings that may spare a GPU model the cost of batch sizes that change."""


def jit_settings(demo: Path, device: str, seconds: float, settle: int = 200) -> dict[str, Any]:
    """For each of ``JIT_SETTINGS``, a freshly loaded resnet18 (fp32): images/s at a fixed
    batch of 48, then at sizes drawn from ``MIXED`` every call (after ``settle`` calls), with
    the slowest call. The in-process ceiling at changing sizes was 0.55-0.65x the
    fixed one on the H200 (runs 3-5): TorchScript's profiling executor specialises by shape."""
    found: dict[str, Any] = {}
    sizes = np.random.default_rng(0).integers(MIXED[0], MIXED[1] + 1, 100_000).tolist()
    x = torch.randn(MIXED[1], 3, 224, 224)
    x = x.pin_memory() if device.startswith("cuda") else x
    for name, apply in JIT_SETTINGS.items():
        strategy = torch.jit.set_fusion_strategy([("STATIC", 2), ("DYNAMIC", 10)])  # defaults
        fuser, optimize = jit_executor_settings()
        apply()
        try:
            module = torch.jit.load(str(demo / "resnet18" / "1" / "model.pt")).eval().to(device)
            row: dict[str, Any] = {}
            with torch.inference_mode():
                for label, pick in (("fixed 48", lambda i: 48), ("changing", sizes.__getitem__)):
                    for i in range(settle if label == "changing" else 3):
                        module(x[: pick(i)].to(device, non_blocking=True)).cpu()
                    images, calls, slowest, started = 0, 0, 0.0, time.perf_counter()
                    while time.perf_counter() - started < seconds:
                        call = time.perf_counter()
                        size = pick(calls + settle)
                        module(x[:size].to(device, non_blocking=True)).cpu()
                        slowest = max(slowest, time.perf_counter() - call)
                        images, calls = images + size, calls + 1
                    row[label] = {
                        "images_per_s": round(images / (time.perf_counter() - started), 1),
                        "slowest_ms": round(slowest * 1000, 1),
                    }
            found[name] = row
        except Exception as exc:
            found[name] = {"failed": repr(exc)}
        finally:
            torch.jit.set_fusion_strategy(strategy)
            set_jit_executor(fuser, optimize)
    return found


def model_path(
    root: Path, demo: Path, device: str, batches: list[int], seconds: float, threads: list[int]
) -> dict[str, Any]:
    """Images/s of torchwire's own model path without the server around it:
    ``LoadedModel.run_batch`` on requests as the batcher hands them over (one read-only array
    per image, a view of received bytes), at each batch size and at changing sizes, fp32, with
    each number of intra-op threads in ``threads`` (the requests' concatenation into pinned
    memory is the thread's one CPU-heavy step). Beside the in-process ceiling it says whether
    a server's batch costs more in the model path or around it (the GIL, the event loop)."""
    repo = repository(root / "model-path", demo, device, "fp32", 1)
    model = LoadedModel.load(
        repo / "resnet18" / "1" / "model.pt", load_model_config(repo / "resnet18" / "config.toml")
    )
    model.warm_up()
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    most = max(*batches, MIXED[1])
    received = [
        np.frombuffer(image.tobytes(), np.float32).reshape(image.shape) for _ in range(most)
    ]
    found: dict[str, Any] = {}
    before = torch.get_num_threads()
    for count in threads:
        torch.set_num_threads(count)
        rows: dict[str, Any] = {}
        sizes_by_run = {str(b): [b] for b in batches}
        sizes_by_run[f"{MIXED[0]}-{MIXED[1]}"] = (
            np.random.default_rng(0).integers(MIXED[0], MIXED[1] + 1, 10_000).tolist()
        )
        for label, sizes in sizes_by_run.items():
            for size in sizes[:3]:
                model.run_batch([[a] for a in received[:size]])
            images, calls, started = 0, 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                size = sizes[calls % len(sizes)]
                model.run_batch([[a] for a in received[:size]])
                images, calls = images + size, calls + 1
            rows[label] = {
                "images_per_s": round(images / (time.perf_counter() - started), 1),
                "ms_per_batch": round((time.perf_counter() - started) / calls * 1000, 2),
            }
        found[f"{count} thread(s)"] = rows
    torch.set_num_threads(before)  # the later stages run as the first did
    model.release()
    return found


# -- torchwire ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One torchwire run: the server's shape and the API the load uses."""

    workers: int = 1
    instances: int = 1
    precision: str = "fp32"
    switch_ms: float = 0  # --gil-switch-interval-ms; 0: the server's default
    protocol: str = "seed"  # or "v2": KServe V2 ModelInfer, as tritonclient sends it
    pad_to: tuple[int, ...] = ()  # [batching] pad_to
    threads: int = 0  # [instances] threads (intra-op); 0: the server's choice (1 on a GPU)
    per_request: int = 1  # images in each request
    stream: bool = False  # PredictStream (one stream per caller) instead of unary calls
    frontend: str = "native"  # --grpc-frontend

    @property
    def name(self) -> str:
        name = f"{self.precision}, {self.workers} worker(s) x {self.instances} instance(s)"
        name += f", GIL switch {self.switch_ms} ms" if self.switch_ms else ""
        name += ", KServe V2" if self.protocol == "v2" else ""
        name += f", batches padded to {'/'.join(map(str, self.pad_to))}" if self.pad_to else ""
        name += f", {self.threads} intra-op threads" if self.threads else ""
        name += f", {self.per_request} images per request" if self.per_request > 1 else ""
        name += ", streamed" if self.stream else ""
        name += f", {self.frontend} gRPC front end" if self.frontend != "native" else ""
        return name


def repository(
    root: Path,
    demo: Path,
    device: str,
    precision: str,
    count: int,
    pad_to: tuple[int, ...] = (),
    threads: int = 0,
) -> Path:
    """resnet18 of the demo (outputs declared FP32) on ``device``, batches up to 64 (padded to
    the sizes of ``pad_to``, if any), ``threads`` intra-op threads if not 0."""
    model = root / "resnet18"
    shutil.rmtree(model, ignore_errors=True)
    (model / "1").mkdir(parents=True)
    shutil.copy(demo / "resnet18" / "1" / "model.pt", model / "1" / "model.pt")
    config = (demo / "resnet18" / "config.toml").read_text().split("[batching]")[0]
    (model / "config.toml").write_text(
        config + f"[batching]\nmax_batch_size = 64\nmax_queue = 4096\npad_to = {list(pad_to)}\n"
        f'[instances]\ncount = {count}\ndevice = "{device}"\nprecision = "{precision}"\n'
        + (f"threads = {threads}\n" if threads else "")
    )
    return root


def scrape(url: str) -> dict[str, float]:
    """The torchwire_ samples of a /metrics page, keyed by name and labels."""
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        f"{s.name}{sorted(s.labels.items()) if s.labels else ''}": s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name.startswith("torchwire_")
    }


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    key = f"{name}[('model', 'resnet18')]"
    return after.get(key, 0.0) - before.get(key, 0.0)


def serve_and_load(repo: Path, run: Run, args: argparse.Namespace, profile: Path | None) -> dict:
    """One closed-loop run against ``torchwire serve``; the server's own view of it alongside."""
    metrics_port = free_port()
    extra = ["--metrics-port", str(metrics_port), "--watchdog-interval-s", "1"]
    extra += ["--gil-switch-interval-ms", str(run.switch_ms)] if run.switch_ms else []
    extra += ["--grpc-frontend", run.frontend]
    with torchwire(repo, run.workers, "resnet18", extra) as (target, process):
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        config = load(
            target, "resnet18", concurrency=args.concurrency, duration_s=args.seconds,
            warmup_s=2.0, timeout_s=30.0, channels=8, protocol=run.protocol, input_name="image",
            batch=run.per_request, stream=run.stream,
        )  # fmt: skip
        # Profiled once the load processes run and are past their warm-up.
        spy = _start_profile(process.pid, profile, 5.0, 4.0, args.native) if profile else None
        before = scrape(url)
        row = closed(config, args.load_procs, process)
        row["images_per_s"] = round(row["qps"] * run.per_request, 1)
        after = scrape(url)
        if spy is not None:
            spy.wait(60)
        batches = _delta(after, before, "torchwire_batch_size_count")
        if batches:
            row["mean_batch"] = round(
                _delta(after, before, "torchwire_batch_size_sum") / batches, 1
            )
            row["compute_ms_per_batch"] = round(
                _delta(after, before, "torchwire_compute_duration_seconds_sum") / batches * 1000, 2
            )
            row["queue_ms_mean"] = round(
                _delta(after, before, "torchwire_queue_duration_seconds_sum")
                / max(1.0, _delta(after, before, "torchwire_queue_duration_seconds_count"))
                * 1000,
                2,
            )
        row["gpu"] = {k: v for k, v in after.items() if k.startswith("torchwire_gpu_")}
    return row


def _start_profile(
    pid: int, out: Path, delay_s: float, seconds: float, native: bool
) -> subprocess.Popen[bytes] | None:
    """py-spy on ``pid`` for ``seconds`` after ``delay_s``, every thread, idle too (a thread
    waiting for the GIL shows where it waits); ``native``: C/C++ frames too (take_gil,
    cudaMemcpyAsync, ...), at half the rate."""
    spy = shutil.which("py-spy") or next(
        (
            str(Path(p) / "bin" / "py-spy")
            for p in sys.path
            if (Path(p) / "bin" / "py-spy").exists()
        ),
        None,
    )
    if spy is None:
        console.print("py-spy not found: no profile")
        return None
    command = (
        f"sleep {delay_s}; exec {spy} record --pid {pid} --duration {int(seconds)} "
        f"--rate {100 if native else 200} {'--native ' if native else ''}"
        f"--threads --idle --format speedscope --output {out}"
    )
    return subprocess.Popen(["sh", "-c", command], stdout=subprocess.DEVNULL)


# -- checks on the real device --------------------------------------------------------------


class Greedy(nn.Module):
    """Sums each item; a batch of n items first allocates (n - 1) * ``per_item`` bytes on the
    device: one item fits, two never do (4 TiB on a GPU; 32 PiB, beyond any address space, on
    CPU, where overcommit could otherwise grant it)."""

    def __init__(self, per_item: int) -> None:
        super().__init__()
        self.per_item = per_item

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = int((x.shape[0] - 1) * self.per_item + 1)
        scratch = torch.zeros(size, dtype=torch.uint8, device=x.device)
        return x.sum(dim=1, keepdim=True) + scratch[0]


class OutOfRange(nn.Module):
    """Each item's first value looked up in a table of 4: 100 is out of range. On a GPU that is
    a device-side assert, after which the process's CUDA context fails every call; on a CPU an
    ordinary IndexError."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()].unsqueeze(1)


def checks(root: Path, demo: Path, device: str, out: Path) -> dict[str, Any]:
    """fp16 with FP32 outputs, out of memory, GPU gauges, memory back after an unload."""
    repo = repository(root / "checks", demo, device, "fp32", 1)
    fp16 = repo / "resnet18_fp16"
    shutil.copytree(repo / "resnet18", fp16)
    config = (fp16 / "config.toml").read_text()
    (fp16 / "config.toml").write_text(config.replace('precision = "fp32"', 'precision = "fp16"'))
    (repo / "greedy" / "1").mkdir(parents=True)
    (repo / "greedy" / "config.toml").write_text(
        'format = "torchscript"\n[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [3]\n'
        f'[instances]\ndevice = "{device}"\n'
    )
    per_item = 2**42 if device.startswith("cuda") else 2**55
    torch.jit.script(Greedy(per_item)).save(str(repo / "greedy" / "1" / "model.pt"))
    metrics_port = free_port()
    log = out / "gpu-checks-server.log"
    found: dict[str, Any] = {}
    # --model-control open: the last check unloads every model over the API (off by default).
    extra = ["--metrics-port", str(metrics_port), "--watchdog-interval-s", "0.5",
             "--log-level", "info", "--model-control", "open"]  # fmt: skip
    with (
        log.open("wb") as stderr,
        torchwire(repo, 1, "resnet18", extra, stderr) as (target, _),
    ):
        client = triton.InferenceServerClient(target)
        deadline = time.monotonic() + 120
        while not all(client.is_model_ready(m) for m in ("resnet18_fp16", "greedy")):
            if time.monotonic() > deadline:
                raise RuntimeError("the check models did not load")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        images = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)

        def infer(model: str, x: np.ndarray, name: str = "image", out: str = "logits") -> Any:
            tensor = triton.InferInput(name, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return client.infer(model, [tensor]).as_numpy(out)

        full, half = infer("resnet18", images), infer("resnet18_fp16", images)
        reference = torch.jit.load(str(demo / "resnet18" / "1" / "model.pt")).eval()
        with torch.inference_mode():
            cpu = reference(torch.from_numpy(images)).numpy()
        found["fp32_vs_cpu_max_abs_diff"] = float(np.abs(full - cpu).max())
        found["fp16_answer_dtype"] = str(half.dtype)
        found["fp16_vs_fp32_max_abs_diff"] = float(np.abs(half - full).max())
        found["fp16_vs_fp32_logit_range"] = float(full.max() - full.min())
        found["fp16_top1_agreement"] = float((half.argmax(1) == full.argmax(1)).mean())
        found["oom"] = _out_of_memory(client, infer)
        time.sleep(1.5)  # two watchdog readings
        gauges = {k: v for k, v in scrape(url).items() if k.startswith("torchwire_gpu_")}
        found["gauges_with_three_models"] = gauges
        for model in ("resnet18", "resnet18_fp16", "greedy"):
            client.unload_model(model)
        time.sleep(1.5)
        found["gauges_after_unloading_all"] = {
            k: v for k, v in scrape(url).items() if k.startswith("torchwire_gpu_")
        }
        client.close()
    found["server_log_splits"] = log.read_text().count("splitting a batch")
    return found


def device_failure(root: Path, device: str, out: Path) -> dict[str, Any]:
    """A device-side assert (an out-of-range index): the batch that found it gets INTERNAL, and
    on a GPU the server stops with exit code 4, to be started again (on a CPU it is an ordinary
    IndexError: the server serves on). The server's log is written to ``out``."""
    repo = root / "device-failure"
    (repo / "out_of_range" / "1").mkdir(parents=True)
    (repo / "out_of_range" / "config.toml").write_text(
        'format = "torchscript"\n[[inputs]]\nname = "x"\ndtype = "FP32"\nshape = [3]\n'
        f'[instances]\ndevice = "{device}"\n'
    )
    torch.jit.script(OutOfRange()).save(str(repo / "out_of_range" / "1" / "model.pt"))
    log = out / "gpu-device-failure-server.log"
    found: dict[str, Any] = {}
    with (
        log.open("wb") as stderr,
        torchwire(repo, 1, "out_of_range", ["--log-level", "info"], stderr) as (target, process),
    ):
        client = triton.InferenceServerClient(target)

        def infer(value: float) -> Any:
            tensor = triton.InferInput("x", [1, 3], "FP32")
            tensor.set_data_from_numpy(np.full((1, 3), value, np.float32))
            return client.infer("out_of_range", [tensor]).as_numpy("output")

        found["in_range_answer"] = float(infer(1.0)[0, 0])
        try:
            infer(100.0)
            found["out_of_range"] = "answered (expected INTERNAL)"
        except Exception as exc:
            found["out_of_range"] = f"{exc.status()}: {exc.message()}"  # type: ignore[attr-defined]
        wait_s = 60 if device.startswith("cuda") else 2
        try:  # on a GPU the process stops (exit code 4); on a CPU it serves on
            found["exit_code_after"] = process.wait(wait_s)
        except psutil.TimeoutExpired:
            found["exit_code_after"] = f"still serving after {wait_s} s"
        client.close()
    found["server_log_tail"] = log.read_text().splitlines()[-6:]
    return found


def _out_of_memory(client: Any, infer: Callable[..., Any]) -> dict[str, Any]:
    """Two items alone: refused. Many one-item requests at once: every one answered, whatever
    batches they formed (the batcher splits those that run out)."""
    from concurrent.futures import ThreadPoolExecutor

    result: dict[str, Any] = {}
    try:
        infer("greedy", np.ones((2, 3), np.float32), "x", "output")
        result["two_items"] = "answered (expected RESOURCE_EXHAUSTED)"
    except Exception as exc:
        result["two_items"] = f"{exc.status()}: {exc.message()}"  # type: ignore[attr-defined]
    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(
                lambda i: infer("greedy", np.full((1, 3), float(i), np.float32), "x", "output"),
                range(512),
            )
        )
    result["one_item_answers_right"] = sum(float(a[0, 0]) == 3.0 * i for i, a in enumerate(answers))
    result["one_item_sent"] = 512
    return result


# -- report ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    demo = ensure_demo_repository(Path(tempfile.gettempdir()) / "torchwire-bench-cache")
    results: dict[str, Any] = {
        "machine": machine(args),
        "in_process": {},
        "torchwire": {},
        "seconds_by_stage": {},
    }
    started = time.monotonic()

    def done(stage: str) -> None:  # what each stage took, for the next run's time limits
        nonlocal started
        results["seconds_by_stage"][stage] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        save(args.out, results)

    with tempfile.TemporaryDirectory() as tmp:
        # The checks first: a run cut short by its time limit loses a figure, not them.
        results["checks"] = {}
        stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("checks", lambda: checks(Path(tmp), demo, args.device, args.out)),
            ("device-failure", lambda: device_failure(Path(tmp), args.device, args.out)),
        ]
        for stage, check in stages:
            if stage in args.stages:
                console.print(f"{stage} on the device ...")
                results["checks"].update(_attempt(check, stage))
                done(stage)
        for precision in args.precisions if "in-process" in args.stages else ():
            console.print(f"in-process, {precision} ...")
            results["in_process"][precision] = _attempt(  # the torchwire runs still tell
                partial(in_process, demo, args.device, precision, args.batches, args.batch_seconds)
            )
            done(f"in-process {precision}")
        if "model-path" in args.stages:
            console.print("model path (LoadedModel.run_batch), fp32 ...")
            results["model_path"] = _attempt(
                lambda: model_path(
                    Path(tmp), demo, args.device, args.batches[-2:], args.batch_seconds, [1, 4]
                )
            )
            done("model path")
        if "jit" in args.stages:
            console.print("TorchScript settings at changing batch sizes ...")
            results["jit_settle"] = settle = 2 if args.quick else 200
            results["jit"] = _attempt(
                lambda: jit_settings(demo, args.device, args.batch_seconds, settle)
            )
            done("jit settings")
        for run in args.runs if "runs" in args.stages else ():
            console.print(f"torchwire {run.name} ...")
            repo = repository(
                Path(tmp) / run.name.replace(" ", "_").replace("/", "-"), demo, args.device,
                run.precision, run.instances, run.pad_to, run.threads,
            )  # fmt: skip
            profile = args.out / "gpu-profile.speedscope.json"
            first = not results["torchwire"] and args.profile
            row = _attempt(partial(serve_and_load, repo, run, args, profile if first else None))
            row.update(asdict(run))
            results["torchwire"][run.name] = row
            done(run.name)
    return results


def _attempt(work: Callable[[], dict[str, Any]], key: str = "") -> dict[str, Any]:
    """``work()``'s result, or what it raised (under ``key`` if given): one failed stage must
    not cost the others their figures."""
    try:
        return work()
    except Exception as exc:
        failed = {"failed": f"{exc!r}"}
        return {key: failed} if key else failed


def save(out: Path, results: dict[str, Any]) -> None:
    """Write what is measured so far (a run cut short by a time limit still reports)."""
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    (out / "gpu.md").write_text(markdown(results))


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    measured = [row for row in r["in_process"].values() if "by_batch" in row]
    batches = list(measured[0]["by_batch"]) if measured else []
    columns = [
        "torchwire", "images/s", "vs in-process best", "P50 ms", "P99 ms", "mean batch",
        "compute ms/batch", "mean queue ms", "server CPU us/image", "errors",
    ]  # fmt: skip
    lines = [
        "# resnet18 on one GPU: in-process vs torchwire (benchmarks/gpu.py)",
        "",
        f"{m['when']}, GPU {m['gpu'] or 'none'}, {m['cpus']} cores, Python {m['python']}, torch "
        f"{m['torch']}; load: {m['load_procs']} processes, {m['concurrency']} callers, closed "
        "loop, one image per request unless the run says more.",
    ]
    if r["in_process"]:
        lines += [
            "",
            "In-process (pinned host tensor copied in, logits copied out, each call), images/s:",
            "",
            "| precision | " + " | ".join(f"batch {b}" for b in batches) + " | best "
            f"| batch {MIXED[0]}-{MIXED[1]}, changing (slowest call ms) |",
            "|---|" + "---|" * (len(batches) + 2),
        ]
    for precision, row in r["in_process"].items():
        if "failed" in row:
            lines.append(f"| {precision} | failed: {row['failed']} |")
            continue
        cells = [
            f"{v['images_per_s']:,.0f} ({v['ms_per_batch']} ms)" for v in row["by_batch"].values()
        ]
        mixed = row["mixed"]
        cells += [
            f"{row['best_images_per_s']:,.0f}",
            f"{mixed['images_per_s']:,.0f} ({mixed['ms_per_batch']} ms, {mixed['slowest_ms']})",
        ]
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    path = r.get("model_path", {})
    if "failed" in path:
        lines += ["", f"Model path (LoadedModel.run_batch): failed: {path['failed']}"]
    elif path:
        sizes = list(next(iter(path.values())))
        lines += [
            "",
            "Model path without the server (LoadedModel.run_batch, one read-only array per "
            "image), fp32, images/s:",
            "",
            "| intra-op threads | " + " | ".join(f"batch {b}" for b in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for threads, row in path.items():
            cells = [f"{v['images_per_s']:,.0f} ({v['ms_per_batch']} ms)" for v in row.values()]
            lines.append(f"| {threads} | " + " | ".join(cells) + " |")
    jit = r.get("jit", {})
    if "failed" in jit:
        lines += ["", f"TorchScript settings: failed: {jit['failed']}"]
    elif jit:
        lines += [
            "",
            "TorchScript settings, in-process fp32, images/s (slowest call ms); changing: "
            f"{MIXED[0]}-{MIXED[1]} at random, measured after {r['jit_settle']} calls to settle:",
            "",
            "| setting | batch 48 | changing |",
            "|---|---|---|",
        ]
        for name, row in jit.items():
            cells = [
                f"{v['images_per_s']:,.0f} ({v['slowest_ms']})" for v in row.values()
            ] if "failed" not in row else [f"failed: {row['failed']}", ""]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name, row in r["torchwire"].items():
        if "failed" in row:
            lines.append(f"| {name} | failed: {row['failed']} |||||||||")
            continue
        best = r["in_process"].get(row["precision"], {}).get("best_images_per_s") or float("nan")
        images = row.get("images_per_s", row["qps"])
        cpu_us = row.get("server_cpu_us_per_request_upper", "")  # per request: per image
        cpu_us = round(cpu_us / row.get("per_request", 1), 1) if cpu_us != "" else ""
        lines.append(
            f"| {name} | {images:,.0f} | {images / best:.2f}x | {row['p50_ms']} | "
            f"{row['p99_ms']} | {row.get('mean_batch', '')} | {row.get('compute_ms_per_batch', '')}"
            f" | {row.get('queue_ms_mean', '')} | {cpu_us}"
            f" | {row['errors']} |"
        )
    lines += ["", "Checks on the device:", "", "```", json.dumps(r.get("checks"), indent=2), "```"]
    stages = ", ".join(f"{stage} {s} s" for stage, s in r.get("seconds_by_stage", {}).items())
    lines += ["", f"Seconds by stage: {stages}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few seconds each (smoke test)")
    parser.add_argument("--batches", type=ints, default=[1, 8, 16, 32, 64])
    parser.add_argument("--batch-seconds", type=float, default=1.5)
    parser.add_argument("--seconds", type=float, default=6.0, help="per torchwire run")
    parser.add_argument("--load-procs", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="py-spy the first torchwire run")
    parser.add_argument("--native", action="store_true", help="the profile with C/C++ frames")
    parser.add_argument(
        "--stages", type=lambda text: set(text.split(",")), default=set(STAGES),
        help=f"which of {','.join(STAGES)} (the torchwire runs: see --diagnose)",
    )  # fmt: skip
    parser.add_argument(
        "--diagnose", action="store_true",
        help="instead of the full set of runs, what bounds one process: unary calls of one "
        "image, a stream, 8 images a request, and 8 workers (the profile is the first run's)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.stages - set(STAGES):
        parser.error(f"--stages: {sorted(args.stages - set(STAGES))} not among {STAGES}")
    args.precisions = ["fp32", "fp16"]
    # The 5 ms GIL switch interval was measured against the 0.5 ms default on the H200 (run 2:
    # 990 vs 1,196 images/s): 8 workers take its place.
    pad = (16, 32, 48, 64)
    # One process on each gRPC front end side by side (issue 28: native >= 0.5x in-process).
    args.runs = [
        Run(), Run(frontend="aio"), Run(pad_to=pad), Run(instances=2), Run(protocol="v2"),
        Run(instances=2, precision="fp16"), Run(workers=4, instances=2), Run(workers=8),
    ]  # fmt: skip
    if args.diagnose:
        args.precisions = ["fp32"]
        # What bounds one process (run 2 of this script on the H200, 2026-11-28: the front end,
        # not the model path): per-request work (8 images a request), per-call work (a stream);
        # the fleet beside them.
        args.runs = [
            Run(), Run(stream=True), Run(per_request=8), Run(workers=8),
            Run(workers=4, per_request=8),
        ]  # fmt: skip
    if args.quick:
        args.batches, args.batch_seconds, args.seconds = [1, 8], 0.3, 2.0
        args.load_procs, args.concurrency = 1, 8
        args.precisions = ["fp32", "bf16"][: len(args.precisions)]
        pad = (4, 8)
        args.runs = [
            Run(),
            Run(pad_to=pad),
            Run(instances=2, precision="bf16", switch_ms=5),
            Run(protocol="v2"),
        ]
        if args.diagnose:
            args.runs = [Run(stream=True), Run(per_request=4)]
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    save(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
