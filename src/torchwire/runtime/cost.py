"""What one call of a model costs, measured once at load, and the two choices that follow.

1. Intra-op threads. Unless the config or ``--torch-threads`` says, a model gets torch's threads
   (shared among its instances) only where they pay: a full batch must take at least
   ``SERIAL_BATCH_S`` on one thread and run ``MIN_SPEEDUP`` times faster on them. Otherwise the
   extra threads only compete with the event loop for the cores (docs/design-notes.md,
   "Intra-op threads").
2. Batches cheap enough to run on the event loop itself (``Batcher`` decides when): those whose
   estimated time on one thread is within ``[batching] inline_max_ms``. Handing a lone request
   to an inference thread and its answer back (two thread wake-ups, the GIL passed both ways)
   costs more CPU than a small model computes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchwire.errors import DeviceFailedError
from torchwire.runtime.model import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_TORCH_THREADS = torch.get_num_threads()
"""torch's intra-op threads before any inference thread sets its own, read once at import. Read
later it would not do: ``torch.set_num_threads`` in one thread becomes what every thread started
after it reads (models are loaded in worker threads, after another model's inference thread may
have set 1), and resnet18 ran on one core of two because of it."""

SERIAL_BATCH_S = 1e-3
"""A full batch that takes less than this on one thread runs on one: splitting it saves too
little to pay for waking the other threads."""
MIN_SPEEDUP = 1.3
"""What torch's threads must gain on a full batch to be used."""
TIMING_BUDGET_S = 2.0
"""The longest batch timed at load, by the one-item time: a full batch that would take longer
on one thread is timed at fewer items and its time extrapolated (a 64-image resnet18 under fp16
autocast on a CPU took 138 s, twice, so its load missed any deadline)."""
_REPEAT_BELOW_S = 0.01  # calls shorter than this are timed five times (the best counts)


@dataclass(frozen=True, slots=True)
class CallCost:
    """A model's measured call times and the intra-op threads chosen from them."""

    threads: int
    """Intra-op threads of each of the model's inference threads."""
    why: str
    """Why that many, for the log and ``torchwire repo check``."""
    one_item_s: float = 0.0
    """One item on one thread (0: not measured, e.g. on a GPU)."""
    per_item_s: float = 0.0
    """Each further item on one thread, from the timed batch's time."""
    batch_items: int = 0
    """Items in the timed batch: the full batch, or fewer where that would take longer than
    ``TIMING_BUDGET_S``."""
    batch_s: dict[int, float] = field(default_factory=dict)
    """The timed batch's time by the intra-op threads it was measured with."""

    def seconds(self, items: int) -> float:
        """Estimated time of a call on ``items`` items on one thread (0 if not measured)."""
        return self.one_item_s + self.per_item_s * (items - 1) if self.one_item_s else 0.0

    def inline_items(self, budget_s: float, max_items: int) -> int:
        """Most items (up to ``max_items``) whose call fits in ``budget_s`` on one thread; 0
        when no call may run inline (not measured, or more than one intra-op thread)."""
        if not self.one_item_s or self.threads != 1 or self.one_item_s > budget_s:
            return 0
        if self.per_item_s <= 0:
            return max_items
        return min(max_items, 1 + int((budget_s - self.one_item_s) / self.per_item_s))


def measure(model: LoadedModel, torch_threads: int = 0, cores: int = 0) -> CallCost:
    """Time ``model`` (already warmed up) and choose its intra-op threads: its ``[instances]
    threads``, else ``torch_threads`` (``--torch-threads``) shared among its instances, else
    ``cores`` (a worker's share of the machine; 0: torch's threads) shared among its instances
    where the measurement says they pay (``choose_threads``).

    Nothing is timed, and nothing will run inline, on a GPU (the device computes; intra-op
    threads would only spin beside the event loop, so it gets 1), or for a model with variable
    input dimensions (its cost depends on
    sizes that the warm-up cannot know: it gets torch's threads). Runs the model a few times
    (blocking: call it where the model is loaded).
    """
    instances = model.config.instances
    shared = max(1, (torch_threads or cores or DEFAULT_TORCH_THREADS) // instances.count)
    if instances.threads:
        threads, why = instances.threads, "set in config"
    elif torch_threads:
        threads, why = shared, "--torch-threads"
    elif model.device.type == "cuda":
        threads, why = 1, "on a GPU"
    else:
        threads, why = shared, ""
    if model.device.type == "cuda":
        return CallCost(threads, why)
    if any(-1 in spec.shape for spec in model.inputs):
        return CallCost(threads, why or "variable input dimensions: not timed")
    if model.config.batching.pad_to:  # its cost moves in steps, not by item
        return CallCost(threads, why or "batches padded ([batching] pad_to): not timed")
    size = model.config.batching.max_batch_size
    try:
        one = _time(model, 1, 1)
        items = batch_items(size, one)
        batch = {1: _time(model, items, 1) if items > 1 else one}
        if not why and shared > 1:
            batch[shared] = _time(model, items, shared)
    except Exception as exc:  # it answered the warm-up: a full batch may still fail
        if isinstance(exc, DeviceFailedError):
            raise
        log.warning("%s: could not time a batch of %d: %s", model.path, size, exc)
        return CallCost(threads, why or f"a batch of {size} failed when timed")
    if not why:
        threads, why = choose_threads(items, batch, shared)
    per_item = max(0.0, (batch[1] - one) / (items - 1)) if items > 1 else 0.0
    return CallCost(threads, why, one, per_item, items, batch)


def batch_items(size: int, one_item_s: float) -> int:
    """Items to time a batch with: the full batch (``size``), or as many as fit in
    ``TIMING_BUDGET_S`` at ``one_item_s`` each (at least 2, for the per-item time)."""
    if size <= 2 or one_item_s * size <= TIMING_BUDGET_S:
        return size
    return max(2, int(TIMING_BUDGET_S / one_item_s))


def choose_threads(size: int, batch_s: dict[int, float], shared: int) -> tuple[int, str]:
    """Intra-op threads for a model whose batch of ``size`` items took ``batch_s`` by thread
    count (1 and ``shared``), and why."""
    if shared == 1:
        return 1, "one core per instance"
    one, many = batch_s[1], batch_s[shared]
    speedup = one / many
    pays = one >= SERIAL_BATCH_S and speedup >= MIN_SPEEDUP
    return (shared if pays else 1), (
        f"{size} items: {one * 1e3:.2f} ms on 1 thread, {speedup:.1f}x on {shared}"
    )


def _time(model: LoadedModel, items: int, threads: int) -> float:
    """Best time of a batch of ``items`` items of zeros with ``threads`` intra-op threads; this
    thread's own thread count is put back after.

    Timed as served: each item its own read-only request, as a message's bytes are, so that the
    batch's joining is in the time; for large inputs it outweighs the model (docs/design-notes.md,
    "Inline batches")."""
    request = model.sample(1)
    for array in request:
        array.flags.writeable = False
    requests = [request] * items
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if model.config.compile.mode != "off":  # a new size may compile: not the call's cost
            model.run_batch(requests)
        return _best(lambda: model.run_batch(requests))
    finally:
        torch.set_num_threads(before)


def _best(call: Callable[[], Any]) -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
        if times[0] >= _REPEAT_BELOW_S:
            break
    return min(times)
