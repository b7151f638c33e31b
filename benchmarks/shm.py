"""System shared memory against inline tensors: server CPU per request for a 600 KB image.

    .venv/bin/python benchmarks/shm.py [--seconds 5] [--callers 4] [--out benchmarks/results]

One ``torchwire serve --allow-client-shm`` serves ``image_mean`` (FP32[3,224,224] -> FP32[1], a
mean: the model costs little, so what is measured is what the request costs), and callers send
the same 602,112-byte image over V2 gRPC with tritonclient, in turns: inline
(``raw_input_contents``), then through a region of /dev/shm each caller registered once
(``tritonclient.utils.shared_memory``), three rounds each. Server CPU per request is the
server process's CPU time over the requests answered. A third way, in the same turns, sends a
16-byte tensor inline to ``small_mean`` (the same model on FP32[4], on the same path: handed to
an inference thread, as image_mean's batches are): what a call costs with (almost) no tensor,
so that the bytes' own cost, each way's excess over it, shows apart from the call's. Writes
``shm.json`` and ``shm.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.utils.shared_memory as shm
from common import torchwire
from torch import nn

from torchwire.repository import ensure_demo_repository

SHAPE = (3, 224, 224)
CONFIG = """\
format = "torchscript"
[[inputs]]
name = "image"
dtype = "FP32"
shape = [3, 224, 224]
[[outputs]]
name = "mean"
dtype = "FP32"
shape = [1]

# One intra-op thread: on two, torch's second thread wakes and spins for every batch, a cost of
# the model's, which this benchmark keeps small so as to measure the request's.
[instances]
threads = 1
"""


class ImageMean(nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=(1, 2, 3)).unsqueeze(1)


class SmallMean(nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=1).unsqueeze(1)


def repository() -> Path:
    root = Path(tempfile.mkdtemp(prefix="shm-bench-"))
    # Never inline, as image_mean's batches are not (they cost more than inline_max_ms): the
    # same path, so that the difference is the bytes'.
    small = CONFIG.replace("[3, 224, 224]", "[4]") + "[batching]\ninline_max_ms = 0\n"
    for name, config in (("image_mean", CONFIG), ("small_mean", small)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.toml").write_text(config)
        script = ImageMean() if name == "image_mean" else SmallMean()
        torch.jit.script(script).save(str(root / name / "1" / "model.pt"))
    # What common.torchwire waits for: a model it knows the shape of.
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    (root / "recsys").symlink_to(demo / "recsys")
    return root


def run(target: str, process: psutil.Process, way: str, callers: int, seconds: float) -> float:
    """Server CPU microseconds per request, ``callers`` closed-loop callers for ``seconds``."""
    shape = (1, 4) if way == "small" else (1, *SHAPE)
    model = "small_mean" if way == "small" else "image_mean"
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    counts, stop, go = [0] * callers, threading.Event(), threading.Barrier(callers + 1)

    def caller(index: int) -> None:
        client = triton_grpc.InferenceServerClient(target)
        x = triton_grpc.InferInput("image", list(shape), "FP32")
        region = None
        if way == "shm":
            key = f"/tw-bench-{os.getpid()}-{index}"
            region = shm.create_shared_memory_region(f"image{index}", key, image.nbytes)
            shm.set_shared_memory_region(region, [image])
            client.register_system_shared_memory(f"image{index}", key, image.nbytes)
            x.set_shared_memory(f"image{index}", image.nbytes)
        else:
            x.set_data_from_numpy(image)
        go.wait()
        while not stop.is_set():
            client.infer(model, [x])
            counts[index] += 1
        if region is not None:
            client.unregister_system_shared_memory(f"image{index}")
            shm.destroy_shared_memory_region(region)
        client.close()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    go.wait()
    time.sleep(1.0)  # warm-up: not counted
    before, done = process.cpu_times(), sum(counts)
    time.sleep(seconds)
    after, answered = process.cpu_times(), sum(counts) - done
    stop.set()
    for thread in threads:
        thread.join()
    spent = (after.user + after.system) - (before.user + before.system)
    return round(spent / max(1, answered) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    found: dict[str, list[float]] = {"inline": [], "shm": [], "small": []}
    with torchwire(
        repository(), 1, "recsys", extra=["--allow-client-shm", "true", "--model-control", "open"]
    ) as (
        target,
        process,
    ):
        for _ in range(3):
            for way in found:
                found[way].append(run(target, process, way, args.callers, args.seconds))
    median = {way: sorted(rounds)[1] for way, rounds in found.items()}
    ratio = median["shm"] / median["inline"]
    # The bytes' own cost: each way's excess over a call that carries almost none.
    excess = {way: median[way] - median["small"] for way in ("inline", "shm")}
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "callers": args.callers,
        "server_cpu_us_per_request": found,
        "median_ratio_shm_to_inline": round(ratio, 2),
        "median_excess_over_small_us": {way: round(v, 1) for way, v in excess.items()},
        "excess_ratio_shm_to_inline": round(excess["shm"] / max(excess["inline"], 1e-9), 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shm.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (
        f"# System shared memory vs inline ({results['date']}, {results['cpus']} cores)\n\n"
        "Command: `.venv/bin/python benchmarks/shm.py`\n\n"
        f"A 602,112-byte FP32[3,224,224] image to `image_mean` over V2 gRPC (tritonclient), "
        f"{args.callers} closed-loop callers, three alternating rounds.\n\n"
        "| | server CPU per request (us), rounds |\n|---|---|\n"
        f"| inline (raw_input_contents) | {' / '.join(map(str, found['inline']))} |\n"
        f"| through a registered region | {' / '.join(map(str, found['shm']))} |\n"
        f"| 16 bytes inline to small_mean (the call alone) | "
        f"{' / '.join(map(str, found['small']))} |\n\n"
        f"Median shared memory / inline: {results['median_ratio_shm_to_inline']}x\n\n"
        f"What the image's bytes cost beyond the call (median minus the 16-byte call's): "
        f"inline {excess['inline']:.0f} us, through a region {excess['shm']:.0f} us, "
        f"{results['excess_ratio_shm_to_inline']}x\n"
    )
    (args.out / "shm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
