"""What a large JSON request costs the other calls of a server: P50/P99 of small gRPC calls (the
demo's recsys, unary, open loop) alone, then while a client posts 3x224x224 images as V2 REST
JSON (3 MB each) back to back, to a model that only averages them.

    .venv/bin/python benchmarks/json_stall.py [--rate 200] [--seconds 5] [--rounds 2]
        [--old-src DIR]

``--old-src DIR`` (e.g. a ``git worktree`` of an older commit's ``src``) runs that torchwire, then
this one, in turns. Parsing JSON holds the GIL: what matters is whether it holds the event loop
too, which every gRPC call of the process waits on.

Measured 2026-11-28 on 2 cores at 4d2a84a: recsys P50/P99 2.3/3.8 ms alone, 72-77/152-157 ms
with JSON images (json.loads takes 65 ms per image on the event loop). Parsing and writing them
in a thread (asyncio.to_thread) was tried and made it far worse: P50 3.1-3.4 s, P99 past the 5 s
timeout. The parsing thread keeps the GIL for whole switch intervals and the event loop, which
gives it up at every system call, waits for it each time (the convoy of
``benchmarks/gil_convoy.py``). A fix needs the parse outside this process's GIL (a process, or a
much faster parser). orjson (8 ms per image instead of 60), 2 rounds against 4d2a84a: recsys
P50/P99 with JSON images 18-25/48-65 vs 140-164/391-548 ms; 62-73 vs 22-23 images/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from common import TORCHWIRE, free_port, wait_serving
from cpu_by_thread import image_repository

from torchwire.bench import LoadConfig, run_load
from torchwire.repository import ensure_demo_repository


def json_image() -> bytes:
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    tensor = {"name": "image", "shape": list(image.shape), "datatype": "FP32"}
    tensor["data"] = image.reshape(-1).tolist()
    return json.dumps({"inputs": [tensor]}).encode()


class JsonSender:
    """Posts the JSON image back to back from a thread until ``stop``; counts the answers."""

    def __init__(self, port: int) -> None:
        self.answered = 0
        self._body = json_image()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(port,))
        self._thread.start()

    def _run(self, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not self._stopping.is_set():
            connection.request("POST", "/v2/models/image/infer", self._body)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
            self.answered += 1
        connection.close()

    def stop(self) -> int:
        self._stopping.set()
        self._thread.join()
        return self.answered


def measure(repository: Path, args: argparse.Namespace, label: str) -> None:
    port, http_port = free_port(), free_port()
    command = [
        TORCHWIRE, "serve", "--repository", str(repository), "--host", "127.0.0.1",
        "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0",
        "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, "recsys", process)
        config = LoadConfig(
            target=target, model="recsys", shape=(256,), rate=args.rate,
            duration_s=args.seconds, warmup_s=1.0, channels=2,
        )  # fmt: skip
        for _ in range(args.rounds):
            alone = run_load(config, progress=False).summary()
            sender = JsonSender(http_port)
            busy = run_load(config, progress=False).summary()
            images = sender.stop()
            print(
                f"{label}: recsys P50/P99 alone {alone['p50_ms']}/{alone['p99_ms']} ms; with JSON "
                f"images posted back to back {busy['p50_ms']}/{busy['p99_ms']} ms "
                f"(max {busy['max_ms']} ms), {images / (args.seconds + 1):.1f} images/s",
                flush=True,
            )
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="recsys calls/s, open loop")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old-src", type=Path, help="an older torchwire's src, run in turns")
    args = parser.parse_args()
    repository = image_repository(Path(tempfile.mkdtemp(prefix="torchwire-json-")))
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    shutil.copytree(demo / "recsys", repository / "recsys")
    if args.old_src is None:
        measure(repository, args, "torchwire")
        return
    rounds = argparse.Namespace(**{**vars(args), "rounds": 1})
    for _ in range(args.rounds):
        os.environ["PYTHONPATH"] = str(args.old_src.resolve())
        measure(repository, rounds, "old")
        del os.environ["PYTHONPATH"]
        measure(repository, rounds, "new")


if __name__ == "__main__":
    sys.exit(main())
