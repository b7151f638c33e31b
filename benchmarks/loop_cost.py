"""torchwire's own event-loop CPU per PredictStream message, without gRPC: steady enough to
compare two versions of the request path on a noisy machine.

    .venv/bin/python benchmarks/loop_cost.py [--messages 20000] [--rounds 6] [--old-src DIR]

``SeedServicer.PredictStream`` of the demo ``recsys`` is driven in this process by an async
iterator of serialized requests (all of them at once: the reader runs ahead, batches form, as at
saturation), and its answers are consumed as gRPC would. What is measured is the event-loop
thread's CPU time per answer: parsing, the repository, the batcher's queue, the answer's
encoding, the metrics; the model runs in its inference thread (the loop is never idle here) and
is not counted. gRPC's own cost per message (the same for any server, see
``benchmarks/servers/echo.py``) is not in it. End to end, ``benchmarks/cpu_by_thread.py``
measures the whole server. ``--old-src DIR`` (e.g. the ``src`` of a ``git worktree`` of an older
commit) runs that torchwire and this one in turns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from torchwire.metrics import Metrics
from torchwire.repository import ensure_demo_repository
from torchwire.repository.repository import ModelRepository
from torchwire.repository.sources import Scanner
from torchwire.server.common.observe import Observer
from torchwire.server.rpc.seed import SeedServicer


class _Context:
    """What PredictStream asks of its gRPC context: no deadline, no metadata."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


def _request(features: np.ndarray[Any, Any]) -> bytes:
    """A PredictRequest of 256 packed floats and metadata model=recsys, as clients send it."""
    floats = features.astype("<f4").tobytes()
    entry = b"\x0a\x05model\x12\x06recsys"
    return b"\x0a\x80\x08" + floats + b"\x12" + bytes([len(entry)]) + entry


async def _measure(messages: int, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
        (Path(tmp) / "recsys").symlink_to(demo / "recsys")
        repository = ModelRepository(
            Scanner(root=Path(tmp)), torch_threads=1, metrics=Metrics(process_metrics=False)
        )
        await repository.load()
        servicer = SeedServicer(repository, Observer(repository.metrics))
        rng = np.random.default_rng(0)
        requests = [_request(rng.standard_normal(256)) for _ in range(8)]

        async def stream() -> AsyncIterator[bytes]:
            for i in range(messages):
                yield requests[i % len(requests)]

        results = []
        for _ in range(rounds):
            started, answers = time.thread_time(), 0
            async for _answer in servicer.PredictStream(stream(), _Context()):  # type: ignore[arg-type]
                answers += 1
            assert answers == messages
            results.append((time.thread_time() - started) / answers * 1e6)
        await repository.close()
        return results


def _report(label: str, results: list[float]) -> None:
    print(
        f"{label}event-loop CPU per PredictStream answer: min {min(results):.1f} us, median "
        f"{statistics.median(results):.1f} us ({len(results)} rounds)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--old-src", type=Path, help="an older torchwire's src, run in turns")
    args = parser.parse_args()
    if args.old_src is None:
        import uvloop

        _report("", uvloop.run(_measure(args.messages, args.rounds)))
        return
    command = [sys.executable, __file__, "--messages", str(args.messages), "--rounds", "3"]
    for _ in range(max(1, args.rounds // 3)):
        for label, path in (("old: ", str(args.old_src.resolve())), ("new: ", None)):
            env = {**os.environ, "PYTHONPATH": path} if path else os.environ
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            print(label + out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
