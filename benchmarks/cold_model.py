"""What the model itself costs per call at a light rate: recsys at batch 1, caches warm against
caches cold.

    .venv/bin/python benchmarks/cold_model.py [--calls 2000] [--rounds 2]

At 800 requests/s a server's thread runs the model once every 1.25 ms, with other work (the
client, the kernel, the front end) between: the model's 1 MB of weights are out of the caches by
then. This calls the TorchScript model in process on one intra-op thread, back to back (warm),
then with 8 MB touched before each call (cold), and prints the thread's CPU per call: the part
of a server's CPU per answer at that rate that is the model's, not the server's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from torchwire.repository import ensure_demo_repository


def per_call_us(module: torch.jit.ScriptModule, calls: int, cold: bool) -> float:
    x = torch.randn(1, 256)
    junk = np.ones(8 << 20, dtype=np.uint8)
    spent = 0.0
    with torch.inference_mode():
        for _ in range(200):
            module(x)
        for _ in range(calls):
            if cold:
                junk.sum()  # what other work between two requests does to the caches
            start = time.thread_time()
            module(x)
            spent += time.thread_time() - start
    return spent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = ensure_demo_repository(Path.home() / ".cache" / "torchwire")
    module = torch.jit.load(str(demo / "recsys" / "1" / "model.pt")).eval()
    for _ in range(args.rounds):
        warm = per_call_us(module, args.calls, cold=False)
        cold = per_call_us(module, args.calls, cold=True)
        print(f"recsys at batch 1: {warm:.0f} us per call warm, {cold:.0f} us cold")


if __name__ == "__main__":
    main()
