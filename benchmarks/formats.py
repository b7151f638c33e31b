"""Model formats side by side, and a Python model's pipeline against the same pipeline in process.

    .venv/bin/python benchmarks/formats.py [--seconds 5] [--out benchmarks/results]

1. recsys as TorchScript and as an AOTInductor package (the demo's ``recsys``, ``recsys-aoti``):
   in-process time per call at batch 1 and 64 on one intra-op thread (as the server runs it),
   then server CPU per answer at 800 requests/s (seed API, one item each) from one server that
   serves both, measured alternately three times after a round that warms both up (the noise
   shows as the spread).
2. ``vision`` (a JPEG in, top-5 out; Pillow decodes in ``preprocess``): images/s of the same
   model.py called in this process (decode then predict, at the best of batch 1/2/4/8), against
   the server answering 8 closed-loop callers of one JPEG each (tritonclient.grpc). The JPEG is a
   640x480 camera-sized frame (``camera_jpeg``); the decoding is counted on both sides.

``--device cuda`` (the GPU machine: ``FORMATS=1 bash benchmarks/gpu.sh``) runs every part on the
GPU: the AOTInductor package is then compiled for CUDA here first (a C++ compiler is needed), and
both servers get ``device = "cuda"``. Writes ``formats.json`` and ``formats.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as triton_grpc
from common import run_with_server_cpu, torchwire
from PIL import Image

from torchwire.bench import LoadConfig
from torchwire.repository import ensure_demo_repository


def per_call_us(call: Any, seconds: float) -> float:
    """Best mean time of ``call`` over five slices of ``seconds`` / 5."""
    for _ in range(20):
        call()
    best = float("inf")
    for _ in range(5):
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            call()
            calls += 1
        best = min(best, (time.perf_counter() - started) / calls)
    return round(best * 1e6, 1)


def repository(demo: Path, device: str) -> Path:
    """recsys, recsys-aoti and vision on ``device``: the demo's own on a CPU; on a GPU, copies
    configured for it, with the AOTInductor package compiled for it."""
    root = Path(tempfile.mkdtemp(prefix="formats-"))
    for name in ("recsys", "recsys-aoti", "vision"):
        if device == "cpu":
            (root / name).symlink_to(demo / name)
            continue
        shutil.copytree(demo / name, root / name, ignore=shutil.ignore_patterns("model.pt2"))
        config = root / name / "config.toml"
        text = config.read_text().replace("[instances]\n", "")
        config.write_text(text + f'\n[instances]\ndevice = "{device}"\n')
    if device != "cpu":
        from torchwire.repository.demo import RecSys

        torch.manual_seed(0)
        module = RecSys().eval().to(device)
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(
            module, (torch.zeros(2, 256, device=device),), dynamic_shapes={"features": {0: batch}}
        )
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(root / "recsys-aoti" / "1" / "model.pt2")
        )
    return root


def recsys_in_process(root: Path, device: str, seconds: float) -> dict[str, Any]:
    torch.set_num_threads(1)
    scripted = torch.jit.load(str(root / "recsys" / "1" / "model.pt"), map_location=device).eval()
    compiled = torch._inductor.aoti_load_package(str(root / "recsys-aoti" / "1" / "model.pt2"))
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    rows: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in (1, 64):
            x = torch.randn(batch, 256, device=device)
            rows[str(batch)] = {
                "torchscript_us": per_call_us(lambda x=x: (scripted(x), sync()), seconds),
                "aoti_us": per_call_us(lambda x=x: (compiled(x), sync()), seconds),
            }
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def recsys_server_cpu(root: Path, seconds: float) -> dict[str, Any]:
    found: dict[str, list[float]] = {"recsys": [], "recsys-aoti": []}
    with torchwire(root, 1, "recsys") as (target, process):
        for index in range(4):  # the first warms both up: not kept
            for model in found:
                config = LoadConfig(
                    target=target, model=model, shape=(256,), rate=800.0, duration_s=seconds,
                    warmup_s=1.0, channels=2, raw=True,
                )  # fmt: skip
                result, cpu_s = run_with_server_cpu(config, 1, process)
                assert not result.errors, result.errors
                if index:
                    found[model].append(round(cpu_s * 1e6, 1))
    return {"cpu_us_per_answer_at_800_per_s": found}


def load_vision(root: Path, device: str) -> Any:
    path = root / "vision" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("vision_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.setup(torch.device(device))
    return model


def vision_in_process(root: Path, device: str, seconds: float, jpeg: bytes) -> dict[str, Any]:
    model = load_vision(root, device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    rows = {}
    with torch.inference_mode():
        for batch in (1, 2, 4, 8):
            request = {"image": np.array([[jpeg]] * batch, dtype=object)}

            def pipeline(request: dict[str, Any] = request) -> None:
                prepared = model.preprocess(request)
                model.predict({"image": torch.from_numpy(prepared["image"]).to(device)})
                sync()

            rows[str(batch)] = round(batch / (per_call_us(pipeline, seconds) / 1e6), 1)
    best = max(rows, key=lambda b: rows[b])
    return {"images_per_s_by_batch": rows, "best_batch": int(best), "best": rows[best]}


def wait_for_vision(target: str, jpeg: bytes) -> None:
    """Until vision answers (the server is ready once recsys is; vision may still load)."""
    client = triton_grpc.InferenceServerClient(target)
    image = triton_grpc.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[jpeg]], dtype=object))
    deadline = time.monotonic() + 120
    while True:
        try:
            client.infer("vision", [image], client_timeout=30)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    client.close()


def vision_server(root: Path, seconds: float, jpeg: bytes, callers: int) -> dict[str, Any]:
    # recsys is there too: what common.torchwire waits for.
    with torchwire(root, 1, "recsys") as (target, process):
        wait_for_vision(target, jpeg)
        counts, errors, stop, measuring = (
            [0] * callers,
            [0] * callers,
            threading.Event(),
            threading.Event(),
        )

        def caller(index: int) -> None:
            client = triton_grpc.InferenceServerClient(target)
            image = triton_grpc.InferInput("image", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[jpeg]], dtype=object))
            while not stop.is_set():
                try:
                    client.infer("vision", [image], client_timeout=30)
                    if measuring.is_set():
                        counts[index] += 1
                except Exception as exc:
                    if not errors[index]:
                        print(f"caller {index}: {exc}")
                    errors[index] += 1
            client.close()

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # warm-up: every caller has sent, the batch sizes settled
        cpu_before = sum(p.cpu_times().user + p.cpu_times().system for p in [process])
        measuring.set()
        started = time.perf_counter()
        time.sleep(seconds)
        measuring.clear()
        elapsed = time.perf_counter() - started
        cpu_spent = sum(p.cpu_times().user + p.cpu_times().system for p in [process]) - cpu_before
        stop.set()
        for thread in threads:
            thread.join()
    answered = sum(counts)
    return {
        "callers": callers,
        "images_per_s": round(answered / elapsed, 1),
        "errors": sum(errors),
        "server_cpu_ms_per_image": round(cpu_spent / max(1, answered) * 1e3, 2),
    }


def camera_jpeg() -> bytes:
    """A 640x480 JPEG (quality 90) of a gradient with noise: a camera frame's size, and harder
    to decode than a smooth image."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 200, 640, dtype=np.float32)
    y = np.linspace(0, 200, 480, dtype=np.float32)[:, None]
    base = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def markdown(r: dict[str, Any]) -> str:
    inproc, cpu = r["recsys_in_process"], r["recsys_server"]["cpu_us_per_answer_at_800_per_s"]
    vision_in = r["vision_in_process"]
    lines = [
        f"# Model formats ({r['date']}, {r['machine']})",
        "",
        "Command: `.venv/bin/python benchmarks/formats.py`",
        "",
        "## recsys: TorchScript vs AOTInductor",
        "",
        "| | TorchScript | AOTInductor |",
        "|---|---|---|",
    ]
    for batch, row in inproc.items():
        lines.append(
            f"| in process, batch {batch}, 1 thread (us/call) | {row['torchscript_us']} | "
            f"{row['aoti_us']} |"
        )
    lines.append(
        "| server CPU per answer at 800/s (us), three rounds | "
        f"{' / '.join(map(str, cpu['recsys']))} | {' / '.join(map(str, cpu['recsys-aoti']))} |"
    )
    lines += [
        "",
        "## vision: a Python model with preprocess (Pillow) vs the same model.py in process",
        "",
        f"A {r['jpeg_bytes']:,}-byte 640x480 JPEG.",
        "",
        f"- in process, decode + predict: {vision_in['images_per_s_by_batch']} images/s by batch;"
        f" best {vision_in['best']} at batch {vision_in['best_batch']}",
    ]
    for run in r["vision_server"]:
        lines.append(
            f"- server, {run['callers']} callers of one JPEG each: {run['images_per_s']} images/s"
            f" ({run['images_per_s'] / vision_in['best']:.2f}x the in-process best), "
            f"{run['errors']} errors, server CPU {run['server_cpu_ms_per_image']} ms per image"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument(
        "--callers", default="8,16", help="vision's closed-loop callers, one run per number"
    )
    args = parser.parse_args()
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    device = args.device
    root = repository(demo, device)
    jpeg = camera_jpeg()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {device}",
        "recsys_in_process": recsys_in_process(root, device, args.seconds),
        "recsys_server": recsys_server_cpu(root, args.seconds),
        "vision_in_process": vision_in_process(root, device, args.seconds, jpeg),
        "jpeg_bytes": len(jpeg),
        "vision_server": [
            vision_server(root, 2 * args.seconds, jpeg, int(callers))
            for callers in args.callers.split(",")
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    name = "formats" if device == "cpu" else "formats-gpu"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
