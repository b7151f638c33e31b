"""Why an inference thread's hand-offs of the GIL matter: a batch of 52 resnet18 images (600 KB
each) concatenated by numpy and by ``torch.cat`` (1 intra-op thread), alone and while another
thread keeps the GIL busy (as the event loop does on a loaded server), with Python's 5 ms switch
interval and with torchwire's 0.5 ms (``--gil-switch-interval-ms``).

    .venv/bin/python benchmarks/gil_convoy.py

numpy releases and re-takes the GIL for every part it copies; each re-take waits up to the switch
interval for the busy thread. Measured here (2 cores, 2026-11-27, two runs), median ms per batch:
numpy 3.2-3.3 alone, 272-276 with a busy thread, 34-37 at 0.5 ms; torch.cat 3.2-3.3, 36-44 and
5.3-6.0.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)


def median_ms(fn: Callable[[], object], calls: int = 30) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[calls // 2] * 1000


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    parts = [  # read-only views of received bytes, as a server holds them
        np.frombuffer(rng.random(150528, np.float32).tobytes(), np.float32).reshape(1, 3, 224, 224)
        for _ in range(52)
    ]
    out = torch.empty(52, 3, 224, 224)
    ways = {
        "numpy": lambda: np.concatenate(parts, out=out.numpy()),
        "torch.cat": lambda: torch.cat([torch.from_numpy(p) for p in parts], out=out),
    }
    stop = threading.Event()

    def busy() -> None:  # pure Python bytecode: holds the GIL but for forced switches
        total = 0
        while not stop.is_set():
            for i in range(1000):
                total += i

    rows = {name: [median_ms(fn)] for name, fn in ways.items()}
    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    for interval in (0.005, 0.0005):
        sys.setswitchinterval(interval)
        for name, fn in ways.items():
            rows[name].append(median_ms(fn))
    stop.set()
    thread.join()
    print("median ms per batch of 52 images | alone | busy GIL, 5 ms | busy GIL, 0.5 ms")
    for name, (alone, slow, fast) in rows.items():
        print(f"{name:9s} | {alone:6.1f} | {slow:6.1f} | {fast:6.1f}")


if __name__ == "__main__":
    main()
