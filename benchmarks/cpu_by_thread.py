"""Where a server's CPU goes per answer, by thread, for one load: the figure issue 16 is about.

    .venv/bin/python benchmarks/cpu_by_thread.py [--server echo|echo-sync|torchwire] [--load stream]
        [--rate 2000] [--concurrency 0] [--seconds 4] [--rounds 2] [--old-src DIR]
        [--model recsys|image] [--protocol seed|v2]

Starts the server as ``benchmarks/run.py`` does (the demo repository), runs the load ``--rounds``
times, and prints per round: server CPU per answer (every process, /proc), the same split by
thread (named as py-spy names them, when it is installed), voluntary and involuntary context
switches per answer, P50 and QPS. ``--old-src DIR`` (e.g. a ``git worktree`` of an older commit's
``src``) runs that torchwire instead, then this one, in turns: old and new side by side.
``--model image`` sends 600 KB images (raw) to a model that only averages them, so what is
measured is the server's cost of a large request; ``--protocol v2`` sends KServe V2 ModelInfer,
and with ``--dtype UINT8`` the images as a vision client can send them: 150 KB of pixels.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import psutil
import torch
from common import free_port, minor_faults, run_with_server_cpu
from run import load, server
from torch import nn

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


class ImageMean(nn.Module):
    """An image in (600 KB of FP32, or 150 KB of UINT8 pixels), 3 floats out, almost no compute:
    what the server spends on a large request, without a model that would hide it."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.float().mean(dim=(2, 3))


IMAGE_CONFIG = """format = "torchscript"
[[inputs]]
name = "image"
dtype = "{dtype}"
shape = [3, 224, 224]
[[outputs]]
name = "logits"
dtype = "FP32"
shape = [3]
[batching]
max_batch_size = 64
[instances]
threads = 1
"""
INPUT_NAMES = {"recsys": "features", "image": "image"}


def image_repository(root: Path, dtype: str = "FP32") -> Path:
    """A repository holding ``image`` (``ImageMean``), its input of ``dtype``."""
    (root / "image" / "1").mkdir(parents=True, exist_ok=True)
    (root / "image" / "config.toml").write_text(IMAGE_CONFIG.replace("{dtype}", dtype))
    torch.jit.script(ImageMean()).save(str(root / "image" / "1" / "model.pt"))
    return root


def measure(kind: str, args: argparse.Namespace, repository: Path) -> None:
    http_port = free_port() if args.protocol == "http" else 0
    with server(kind, repository, args.model, http_port) as (target, process):
        stream = args.load == "stream"
        target = f"127.0.0.1:{http_port}" if http_port else target
        config = load(
            target, args.model, stream=stream, channels=4 if stream else 2,
            duration_s=args.seconds, rate=0.0 if args.concurrency else args.rate,
            concurrency=args.concurrency, raw=args.model == "image", protocol=args.protocol,
            input_name=INPUT_NAMES[args.model], datatype=args.dtype,
        )  # fmt: skip
        for _ in range(args.rounds):
            switches, threads = process.num_ctx_switches(), thread_cpu_s(process)
            faults = minor_faults(process.pid)
            result, cpu_s = run_with_server_cpu(config, 1, process)
            after, spent = process.num_ctx_switches(), thread_cpu_s(process) - threads
            faults = minor_faults(process.pid) - faults
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
                f"{faults / answers:.1f} page faults per answer; "
                f"P50 {result.summary().get('p50_ms')} ms, {result.qps:,.0f} QPS",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server", choices=("echo", "echo-sync", "torchwire", "torchwire-aio"), default="torchwire"
    )
    parser.add_argument("--load", choices=LOADS, default="stream")
    parser.add_argument("--rate", type=float, default=2000.0, help="answers/s, open loop")
    parser.add_argument("--concurrency", type=int, default=0, help="closed loop instead")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old-src", type=Path, help="an older torchwire's src, run in turns")
    parser.add_argument(
        "--model", choices=tuple(INPUT_NAMES), default="recsys",
        help="recsys (1 KB requests) or image (600 KB ones, a model that does next to nothing)",
    )  # fmt: skip
    parser.add_argument(
        "--protocol", choices=("seed", "v2", "http"), default="seed",
        help="http: KServe V2 REST with binary tensors (unary, torchwire only)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("FP32", "UINT8"), default="FP32",
        help="the image model's input (UINT8: over --protocol v2; the seed API sends floats)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.dtype != "FP32" and (args.model != "image" or args.protocol == "seed"):
        parser.error("--dtype UINT8 needs --model image and --protocol v2 or http")
    if args.protocol == "http" and (args.load != "unary" or args.server != "torchwire"):
        parser.error("--protocol http needs --load unary --server torchwire")
    if args.model == "image":
        demo = image_repository(Path(tempfile.mkdtemp(prefix="torchwire-image-")), args.dtype)
    else:
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
