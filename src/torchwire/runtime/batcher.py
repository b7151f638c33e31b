"""The dynamic batcher of one loaded model version: a queue and the inference threads behind it.

Requests are queued by the event loop; each inference thread takes, as soon as it is free, every
queued request that fits in ``max_batch_size`` items (a request is never split; one larger than
``max_batch_size`` runs alone), runs the model once on all their rows, and hands every caller a
view of its own. A lone request is taken at once: nobody waits for company that is not coming,
while requests that arrive during a model call fill the next batch. When the model fails on a
batch (it raises, or runs out of memory), the halves are run again, down to single requests, so
that only a request that fails alone gets the error. When the device fails for good (a sticky CUDA
error), the batch's requests get the error, every other request UNAVAILABLE, and
``on_device_failure`` tells the server, which stops the process so that it starts again.

With several instances, a thread that finds a partial batch while another instance is computing
waits for more requests until the batch is full or its oldest request has waited
``max_delay_ms``: otherwise the instances would split the queue into small batches. With nothing
else in flight there is nothing to wait for, and the batch leaves at once.

Only the queue hand-off and one ``call_soon_threadsafe`` per batch touch the event loop, with one
exception: a model whose calls cost less than handing them over (``runtime.cost``: a batch
estimated within ``[batching] inline_max_ms``) runs on the event loop itself when no inference
thread is busy and the loop is not (``LOOP_BUSY``). The decision is taken once per loop turn,
after that turn's requests are queued. A busy server still batches in the inference threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchwire.errors import (
    RETRY_AFTER_METADATA,
    RETRY_PUSHBACK_METADATA,
    DeadlineExceededError,
    DeviceFailedError,
    InvalidInputError,
    ModelExecutionError,
    ModelOutOfMemoryError,
    QueueFullError,
    TorchwireError,
    UnavailableError,
    VersionClosedError,
    exception_chain,
    report_bug,
)
from torchwire.metrics import ModelMetrics
from torchwire.runtime.arrays import Arrays
from torchwire.runtime.cost import CallCost
from torchwire.runtime.model import LoadedModel
from torchwire.runtime.steps import step_pool

log = logging.getLogger(__name__)

LOOP_BUSY = 0.7
"""Above this share of wall time in which the event loop's thread ran or waited for a core,
cheap batches go to the inference threads: the loop is needed for requests, and a busy server
batches (why 0.7: docs/design-notes.md, "Inline batches")."""
_LOAD_WINDOW_S = 0.02
INLINE_GIVE_UP_S = 0.002
INLINE_GIVE_UP_FACTOR = 10
INLINE_GIVE_UP_AFTER = 2
"""Successful batches on the event loop, in a row, that each took more CPU time than both of
these (seconds, and times the estimate) turn inline runs off for the model version: its cost
was misjudged. Two, so that one garbage collection during a call does not."""
INLINE_RETRY_S = 30.0
INLINE_RETRY_MAX_S = 600.0
"""Inline runs turned off are tried again after ``INLINE_RETRY_S``, then after twice as long
each time they are turned off again, up to ``INLINE_RETRY_MAX_S``: a model slow only for a
while (a cold start, a page-fault storm) gets them back."""


class ThreadLoad:
    """The share of wall time the thread that made it (the event loop's, the native front end's)
    wanted a CPU: ran, or was ready to and waited for one (Linux's schedstat; elsewhere, the time
    it ran), over the last complete window of about ``_LOAD_WINDOW_S``. A thread that waits for a
    core is as busy as one that runs: on a machine whose cores are all taken, the CPU time alone
    looks idle."""

    __slots__ = ("_fd", "_since", "_wanted", "busy")

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open(
                f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY
            )
        except OSError:
            self._fd = None
        self._since, self._wanted, self.busy = time.perf_counter(), self._read(), 0.0

    def _read(self) -> float:
        if self._fd is not None:
            try:
                ran_ns, waited_ns, _ = os.pread(self._fd, 64, 0).split()
                return (int(ran_ns) + int(waited_ns)) / 1e9
            except (OSError, ValueError):
                os.close(self._fd)
                self._fd = None
        return time.thread_time()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def update(self) -> float:
        now = time.perf_counter()
        if now - self._since >= _LOAD_WINDOW_S:
            wanted = self._read()
            self.busy = (wanted - self._wanted) / (now - self._since)
            self._since, self._wanted = now, wanted
        return self.busy


Done = Callable[[Arrays | TorchwireError], None]
"""Where a request queued with ``Batcher.enqueue`` gets its outcome: its own rows, or the error."""


@dataclass(slots=True, eq=False)
class Ticket:
    """A request in a batcher's queue. Its outcome goes to ``future`` (on the event loop) or to
    ``done`` (called on the thread that computed it)."""

    arrays: Sequence[np.ndarray[Any, Any]]
    items: int
    future: asyncio.Future[Arrays] | None
    deadline: float | None  # time.monotonic(); None: no deadline
    done: Done | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    # Requests batch together only if their items have the same shapes (variable dimensions).
    shape_key: tuple[tuple[int, ...], ...] = ()
    dropped: bool = False

    def cancel(self) -> None:
        """The caller went away: the request is not computed (if it was not already)."""
        self.dropped = True
        if self.future is not None:
            self.future.cancel()

    def cancelled(self) -> bool:
        return self.dropped or (self.future is not None and self.future.cancelled())


@dataclass
class VersionStats:
    """Counts and cumulative durations of one model version (KServe V2 ModelStatistics)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # items computed
    execution_count: int = 0  # model calls
    last_inference_ms: int = 0  # wall clock of the last model call, ms since the epoch


_Outcome = tuple[Ticket, Arrays | TorchwireError]


class Batcher:
    """Queue and inference threads of one model version.

    Args:
        model: the loaded model; called only from this batcher's threads.
        label: how logs and errors name the model, e.g. ``recsys:1``.
        cost: the model's measured call times and intra-op threads (``runtime.cost.measure``;
            None: one thread, nothing runs inline).
        metrics: where to observe queue time, compute time and batch sizes.
        on_device_failure: called on the event loop with the ``DeviceFailedError`` when the
            model's device fails for good (once).
    """

    def __init__(
        self,
        model: LoadedModel,
        name: str,
        version: int,
        cost: CallCost | None = None,
        metrics: ModelMetrics | None = None,
        on_device_failure: Callable[[DeviceFailedError], None] | None = None,
    ) -> None:
        self.model = model
        self.name = name
        self.version = version
        self.label = f"{name}:{version}"
        self.host = ""
        """The process computing it when not this one (an engine), for the banner."""
        self._metrics = metrics
        self._on_device_failure = on_device_failure
        batching = model.config.batching
        self.max_batch_size = batching.max_batch_size
        self.max_queue = batching.max_queue
        self.max_delay_s = batching.max_delay_ms / 1000
        self.instances = model.config.instances.count
        self.cost = cost or CallCost(1, "not measured")
        self.intra_op_threads = self.cost.threads
        """Intra-op (torch) threads of each of this model's inference threads."""
        self.inline_items = self.cost.inline_items(
            batching.inline_max_ms / 1000, self.max_batch_size
        )
        """Most items a batch may have to run on the event loop (0: never; never for a model
        with per-request steps, whose requests are queued from the step threads)."""
        if model.prepares or model.finishes:
            self.inline_items = 0
        self._inline_measured = self.inline_items  # what a retry restores
        self._inline_back_at: float | None = None  # time.monotonic() of the next retry
        self._inline_pause_s = INLINE_RETRY_S
        self._flush_pending = False
        self._loop_load: ThreadLoad | None = None  # made on the loop's thread, by start()
        self._gathering = 0  # inference threads holding a partial batch, waiting for more
        self._overruns = 0  # inline batches in a row that cost far more than estimated
        self._queue: deque[Ticket] = deque()
        self._queued_items = 0
        # Items in the step threads' preprocess and postprocess: counted against max_queue.
        self._preparing = 0
        self._finishing = 0
        self._computing = 0  # instance threads inside a model call
        self._cond = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = VersionStats()

    @property
    def available(self) -> bool:
        """Whether it takes requests now (V2 model readiness)."""
        return not self._closing and not self.model.device_failed

    @property
    def queued_items(self) -> int:
        """Items waiting in the queue now."""
        return self._queued_items

    @property
    def computing(self) -> int:
        """Batches being computed now (by the inference threads, or on the event loop)."""
        return self._computing

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the inference threads; answers are delivered on ``loop``."""
        self._loop = loop
        for index in range(self.instances):
            thread = threading.Thread(
                target=self._run, name=f"torchwire-{self.label}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        if self.inline_items:  # the loop thread runs the model too: on one intra-op thread
            _one_intra_op_thread()
            self._loop_load = ThreadLoad()

    def submit(
        self, arrays: Sequence[np.ndarray[Any, Any]], items: int, deadline: float | None = None
    ) -> asyncio.Future[Arrays]:
        """Queue one validated request of ``items`` items; the future resolves to its own rows.

        Cancelling the future (as cancelling a task that awaits it does) drops the request: the
        inference thread skips it. No task is created per request.

        Raises:
            QueueFullError: the queue holds ``max_queue`` items already (raised at once).
            UnavailableError: the batcher is closing (raised at once).

        The future fails with ``DeadlineExceededError`` when ``deadline`` (``time.monotonic()``)
        passes while queued, or ``ModelExecutionError`` when the model raises on this request.
        """
        self._check_open()
        assert self._loop is not None
        future: asyncio.Future[Arrays] = self._loop.create_future()
        if self.model.prepares:
            self._prepare_later(Ticket(arrays, items, future, deadline))
            return future
        with self._cond:
            self._append(Ticket(arrays, items, future, deadline))
            if not self._may_run_inline(self._loop_load):
                self._cond.notify()
            elif not self._flush_pending:  # decide once this loop turn's requests are queued
                self._flush_pending = True
                self._loop.call_soon(self._flush)
        return future

    def enqueue(
        self,
        arrays: Sequence[np.ndarray[Any, Any]],
        items: int,
        deadline: float | None,
        done: Done,
    ) -> Ticket:
        """``submit`` from any thread, the outcome going to ``done`` instead of a future, on the
        thread that computes it. Nothing runs until ``dispatch``: queue a turn's requests, then
        dispatch once. Raises as ``submit`` does."""
        self._check_open()
        ticket = Ticket(arrays, items, None, deadline, done)
        if self.model.prepares:
            self._prepare_later(ticket)
            return ticket
        with self._cond:
            self._append(ticket)
        return ticket

    def _prepare_later(self, ticket: Ticket) -> None:
        """Hand ``ticket`` to a step thread, which prepares it (``model.prepare``) and queues
        it; its items count against ``max_queue`` meanwhile. Raises as ``_append`` does."""
        with self._cond:
            self._check_room(ticket.items)
            self._preparing += ticket.items
        step_pool().submit(self._prepare, ticket)

    def _prepare(self, ticket: Ticket) -> None:
        """On a step thread: prepare the request and queue it, or answer its error."""
        error: TorchwireError | None = None
        queued = False
        try:
            if not ticket.cancelled():
                ticket.arrays = self.model.prepare(ticket.arrays, ticket.items)
        except TorchwireError as exc:
            error = exc
        except BaseException as exc:  # a bug of ours (or SystemExit): INTERNAL, the rest logged
            error = report_bug(log, f"{self.label}: preparing a request failed", exc)
        finally:
            with self._cond:
                self._preparing -= ticket.items
                if error is None and not ticket.cancelled():
                    ticket.enqueued_at = time.monotonic()  # queue time starts now
                    self._queue_ticket(ticket)
                    queued = True
                # While closing, every inference thread waits for this one: wake them all.
                if self._closing:
                    self._cond.notify_all()
                elif queued:
                    self._cond.notify()
        if error is not None:
            deliver_here([(ticket, error)], self._loop)

    def dispatch(self, load: ThreadLoad) -> None:
        """After ``enqueue``: run what is queued on the calling thread, whose ``load`` it is, if
        it is cheap, no inference thread holds a batch and the thread is not busy (its answers
        leave from here); else wake an inference thread."""
        with self._cond:
            batch = self._take_here(load)
        if batch is not None:
            self._run_here(batch, self._loop)

    def _check_open(self) -> None:
        if self._closing or self._loop is None:
            raise VersionClosedError(f"model {self.label} is shutting down")
        if self.model.device_failed:
            raise self._unavailable()

    def _append(self, ticket: Ticket) -> None:
        """Queue ``ticket`` (call with ``_cond`` held), or refuse it."""
        self._check_room(ticket.items)
        self._queue_ticket(ticket)

    def _check_room(self, items: int) -> None:
        """Refuse a request of ``items`` items that the queue cannot take (``_cond`` held)."""
        if self._closing:  # checked again under the lock: close() may have begun since
            raise VersionClosedError(f"model {self.label} is shutting down")
        if items > self.max_queue:
            raise InvalidInputError(
                f"model {self.label}: the request has {items} items, more than its queue "
                f"holds (max_queue = {self.max_queue}); send at most that many per request"
            )
        if self._waiting() + items > self.max_queue:
            raise self._queue_full(f"this request adds {items}")

    def _waiting(self) -> int:
        """Items queued, or in a step thread's preprocess or postprocess."""
        return self._queued_items + self._preparing + self._finishing

    def _queue_ticket(self, ticket: Ticket) -> None:
        arrays = ticket.arrays
        key = (arrays[0].shape[1:],) if len(arrays) == 1 else tuple(a.shape[1:] for a in arrays)
        ticket.shape_key = key
        self._queue.append(ticket)
        self._queued_items += ticket.items

    def admit(self, deadline: float | None, now: float) -> None:
        """Refuse, before the request is decoded, what cannot be answered: a full queue, or a
        deadline (``time.monotonic()``) that the work queued ahead would outlast.

        Raises:
            UnavailableError: the batcher is closing or its device failed.
            QueueFullError: refused for load, with the wait to retry after as metadata.
        """
        self._check_open()
        if self._waiting() >= self.max_queue:
            with self._cond:
                raise self._queue_full("")
        self._check_deadline(self._queued_items + self._preparing, deadline, now)

    def _check_deadline(
        self, ahead: int, deadline: float | None, now: float, where: str = ""
    ) -> None:
        """Refuse (counted) a request whose ``deadline`` the ``ahead`` items queued before it
        would outlast; ``where`` names the queue in the message."""
        if deadline is None or not ahead:
            return
        wait_s = ahead * self._per_item_s() / self.instances
        if now + wait_s > deadline:
            if self._metrics is not None:
                self._metrics.too_late.inc()
            wait_ms = max(1, round(wait_s * 1000))
            left_ms = max(0.0, (deadline - now) * 1000)
            raise QueueFullError(
                f"model {self.label}: about {wait_ms} ms of queued work ahead{where}, more than "
                f"the {left_ms:.0f} ms left before the deadline; retry in about {wait_ms} ms",
                metadata=retry_after(wait_ms),
            )

    def _queue_full(self, adds: str) -> QueueFullError:
        """The refusal of a full queue (call with ``_cond`` held), counted."""
        if self._metrics is not None:
            self._metrics.queue_full.inc()
        wait_ms = self._drain_estimate_ms()
        adds = f", {adds}" if adds else ""
        steps = self._preparing + self._finishing
        steps_text = f" ({steps} of them in pre- or postprocess)" if steps else ""
        return QueueFullError(
            f"model {self.label}: queue full ({self._waiting()} of {self.max_queue} items "
            f"waiting{steps_text}{adds}); retry in about {wait_ms} ms",
            metadata=retry_after(wait_ms),
        )

    def _may_run_inline(self, load: ThreadLoad | None) -> bool:
        """Whether what is queued may yet run on the calling thread, whose ``load`` it is (call
        with ``_cond`` held): the model is cheap, no inference thread holds a batch, and the
        thread is not busy."""
        if not self.inline_items and not self._retry_inline():
            return False
        if self._computing or self._gathering or self._closing or load is None:
            return False
        return load.update() <= LOOP_BUSY

    def _flush(self) -> None:
        """On the event loop: run what is queued right here if it is cheap, no inference
        thread is busy and the loop is not; else wake an inference thread."""
        self._flush_pending = False
        with self._cond:
            batch = self._take_here(self._loop_load)
        if batch is not None:
            self._run_here(batch, None)

    def _take_here(self, load: ThreadLoad | None) -> list[Ticket] | None:
        """The queued batch to run on the calling thread if it may (``_may_run_inline``), else
        None with an inference thread woken (call with ``_cond`` held)."""
        if not self._queue:
            return None
        # _may_run_inline first: a retry that is due restores inline_items.
        if not self._may_run_inline(load) or self._queued_items > self.inline_items:
            self._cond.notify()
            return None
        batch, _ = self._first_batch()
        if self._queue:  # other shapes: they do not batch with these
            self._cond.notify()
        self._computing += 1
        return batch

    def _run_here(self, batch: list[Ticket], loop: asyncio.AbstractEventLoop | None) -> None:
        """Compute ``batch`` on this thread (``loop``: the event loop, if this is not its
        thread) and answer it; a batch that cost far more than estimated counts against inline
        runs (``_judge_inline``)."""
        _one_intra_op_thread()
        started = time.thread_time()
        outcomes = self._process(batch)
        spent = time.thread_time() - started
        self._deliver(outcomes, loop)
        if not any(isinstance(outcome, TorchwireError) for _, outcome in outcomes):
            self._judge_inline(spent, sum(request.items for request in batch))

    def _judge_inline(self, spent: float, items: int) -> None:
        """After a batch that succeeded on the loop in ``spent`` s of CPU: a second overrun in a
        row (``INLINE_GIVE_UP_*``) turns inline runs off; the model's cost was misjudged. Under
        the lock: the loop and the native front end's thread may both judge at once."""
        estimate = self.cost.seconds(items)
        with self._cond:
            if spent <= max(INLINE_GIVE_UP_S, INLINE_GIVE_UP_FACTOR * estimate):
                self._overruns = 0
                return
            self._overruns += 1
            if self._overruns < INLINE_GIVE_UP_AFTER or not self.inline_items:
                return  # not yet, or already off (another thread's overrun)
            self.inline_items = 0
            pause_s = self._inline_pause_s
            self._inline_back_at = time.monotonic() + pause_s
            self._inline_pause_s = min(INLINE_RETRY_MAX_S, 2 * pause_s)
        log.warning(
            "%s: %d batches in a row took far longer on the event loop than measured at load "
            "(the last %.1f ms of CPU, %.2f ms expected; does the model's cost depend on its "
            "inputs' values?); its batches run in its inference threads, inline runs are tried "
            "again in %.0f s (set [batching] inline_max_ms = 0 never to run them)",
            self.label, INLINE_GIVE_UP_AFTER, spent * 1e3, estimate * 1e3, pause_s,
        )  # fmt: skip

    def _retry_inline(self) -> bool:
        """Inline runs back, if they were turned off and their retry is due (call with
        ``_cond`` held); True if they are back."""
        if self._inline_back_at is None or time.monotonic() < self._inline_back_at:
            return False
        self._inline_back_at = None
        self._overruns = 0
        self.inline_items = self._inline_measured
        return True

    def _per_item_s(self) -> float:
        """Compute time per item: the mean so far, else the measured full batch's, else 1 ms."""
        stats = self.stats
        if stats.inference_count:
            return stats.compute_ns / stats.inference_count / 1e9
        full = self.cost.seconds(self.max_batch_size)
        return full / self.max_batch_size if full else 1e-3

    def _drain_estimate_ms(self) -> int:
        """How long the queued items take to compute (call with ``_cond`` held); 1 ms at
        least."""
        return self._compute_ms(self._queued_items)

    def _compute_ms(self, items: int) -> int:
        """How long ``items`` queued items take to compute on the instances; 1 ms at least."""
        return max(1, round(items * self._per_item_s() / self.instances * 1000))

    async def close(self, timeout_s: float = 30.0) -> bool:
        """Refuse new requests, finish the queued ones, and stop the threads; return False if a
        thread was still busy after ``timeout_s`` (it is left behind: threads cannot be
        killed, and they are daemon threads, so the process can still exit)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._loop_load is not None:
            self._loop_load.close()
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error(
                    "inference thread %s still busy after %.1f s: abandoned", thread.name, timeout_s
                )
        if any(thread.is_alive() for thread in threads):
            return False
        if not await asyncio.to_thread(self._wait_finished, max(0.0, deadline - time.monotonic())):
            log.error(
                "%s: postprocess still busy after %.1f s: not released", self.label, timeout_s
            )
            return False
        # Its device memory back to the device, off the loop (emptying CUDA's cache waits for
        # the device).
        try:
            await asyncio.to_thread(self.model.release)
        except Exception as exc:  # the process goes on (or is stopping): the memory is lost
            log.warning("%s: could not release its memory: %s", self.label, exc)
        return True

    def _wait_finished(self, timeout_s: float) -> bool:
        """Until no request is in ``finish`` (the model is about to be released); False if one
        still is after ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._finishing, timeout_s)

    # -- inference threads -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.intra_op_threads)
        while (batch := self._take()) is not None:
            outcomes = self._process(batch)
            assert self._loop is not None
            if not self._deliver(outcomes, self._loop):
                return  # the loop is closed: nobody is left to answer

    def _deliver(self, outcomes: list[_Outcome], loop: asyncio.AbstractEventLoop | None) -> bool:
        """Answer a computed batch (``deliver_here``); the rows of a model that ``finishes``
        go through a step thread first."""
        if not self.model.finishes:
            return deliver_here(outcomes, loop)
        now: list[_Outcome] = []
        for ticket, outcome in outcomes:
            if isinstance(outcome, TorchwireError) or ticket.cancelled():
                now.append((ticket, outcome))
                continue
            with self._cond:
                self._finishing += ticket.items
            step_pool().submit(self._finish, ticket, outcome, self._loop)
        return deliver_here(now, loop) if now else True

    def _finish(self, ticket: Ticket, rows: Arrays, loop: asyncio.AbstractEventLoop | None) -> None:
        """On a step thread: one request's rows through ``model.finish``, then answered."""
        outcome: Arrays | TorchwireError
        try:
            outcome = self.model.finish(rows)
        except TorchwireError as exc:
            outcome = exc
        except BaseException as exc:
            outcome = report_bug(log, f"{self.label}: finishing a request failed", exc)
        finally:
            with self._cond:
                self._finishing -= ticket.items
                self._cond.notify_all()
        deliver_here([(ticket, outcome)], loop)

    def _process(self, batch: list[Ticket]) -> list[_Outcome]:
        """Compute a batch taken from the queue (``_computing`` counts it); count the outcomes."""
        try:
            try:
                outcomes = self._compute(batch)
            except Exception as exc:  # a bug here must not kill the thread or strand callers
                bug = report_bug(log, f"{self.label} failed on a batch", exc)
                outcomes = [(r, bug) for r in batch]
            self._tally(outcomes)  # before another batch can start and tally too
        finally:
            with self._cond:
                self._computing -= 1
        return outcomes

    def _take(self) -> list[Ticket] | None:
        with self._cond:
            while not self._queue:
                if self._closing and not self._preparing:
                    return None
                self._cond.wait()
            batch, items = self._first_batch()
            first = batch[0]
            if items < self.max_batch_size and self._computing and self.max_delay_s:
                # Another instance is busy: wait a little for batchmates rather than run small.
                deadline = first.enqueued_at + self.max_delay_s
                self._gathering += 1
                try:
                    while items < self.max_batch_size and not self._closing:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or not self._cond.wait(remaining):
                            break
                        items = self._fill(batch, items)
                finally:
                    self._gathering -= 1
            self._computing += 1
            return batch

    def _first_batch(self) -> tuple[list[Ticket], int]:
        """Take the oldest request and what fits beside it (under the lock); return the batch
        and its items."""
        first = self._queue.popleft()
        self._queued_items -= first.items
        batch = [first]
        return batch, self._fill(batch, first.items)

    def _fill(self, batch: list[Ticket], items: int) -> int:
        """Move queued requests that fit into ``batch`` (under the lock); return its items."""
        key = batch[0].shape_key
        while (
            self._queue
            and items + self._queue[0].items <= self.max_batch_size
            and self._queue[0].shape_key == key
        ):
            request = self._queue.popleft()
            batch.append(request)
            items += request.items
            self._queued_items -= request.items
        return items

    def _compute(self, batch: list[Ticket]) -> list[_Outcome]:
        now = time.monotonic()
        outcomes: list[_Outcome] = []
        live: list[Ticket] = []
        for request in batch:
            if request.cancelled():  # the caller went away: compute nothing for nobody
                continue
            if request.deadline is not None and now >= request.deadline:
                waited_ms = (now - request.enqueued_at) * 1000
                outcomes.append(
                    (
                        request,
                        DeadlineExceededError(f"deadline passed after {waited_ms:.1f} ms queued"),
                    )
                )
                continue
            live.append(request)
        if live:
            outcomes.extend(self._run_or_split(live))
        return outcomes

    def _run_or_split(self, batch: list[Ticket]) -> list[_Outcome]:
        """Run ``batch``; if the model fails on it (raises, or runs out of memory), run each half
        again, down to single requests: only the request that fails alone gets the error, in
        about 2 log2(n) calls for one poisoned request among n."""
        if self.model.device_failed:  # found failed (by any model on it): nothing runs there
            return [(request, self._unavailable()) for request in batch]
        try:
            return self._run_batch(batch)
        except DeviceFailedError as exc:
            if exc.seen_before:  # another batch found it (and said so): this one is retried
                return [(request, self._unavailable()) for request in batch]
            self._device_failed(exc)
            failure = _without_frames(exc)
            return [(request, failure) for request in batch]
        except ModelExecutionError as exc:
            failed = _without_frames(exc)
        # The halves run outside the except block, with no traceback: its frames would keep
        # the failed batch's tensors in (device) memory.
        if len(batch) == 1:
            return [(batch[0], failed)]
        if isinstance(failed, ModelOutOfMemoryError):  # the model logged a warning already
            log.info("%s: splitting a batch of %d requests", self.label, len(batch))
        half = len(batch) // 2
        return self._run_or_split(batch[:half]) + self._run_or_split(batch[half:])

    def _device_failed(self, failure: DeviceFailedError) -> None:
        """This batch found the device failed for good (requests are refused from now on):
        say so."""
        log.critical("%s: %s; every request to it is refused from now on", self.label, failure)
        if self._on_device_failure is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
                self._loop.call_soon_threadsafe(self._on_device_failure, failure)

    def _unavailable(self) -> UnavailableError:
        return UnavailableError(
            f"model {self.label} cannot compute: its device {self.model.device} failed; this "
            "server restarts, retry (on another replica)"
        )

    def _run_batch(self, batch: list[Ticket]) -> list[_Outcome]:
        started = time.monotonic()
        succeeded = False
        items = sum(request.items for request in batch)
        try:
            outputs = self.model.run_batch([request.arrays for request in batch])
            succeeded = True
        finally:
            self._count(batch, items, started, succeeded)
        if len(batch) == 1:
            return [(batch[0], outputs)]
        outcomes: list[_Outcome] = []
        start = 0
        for request in batch:
            stop = start + request.items
            outcomes.append((request, [out[start:stop] for out in outputs]))
            start = stop
        return outcomes

    def _count(self, batch: list[Ticket], items: int, started: float, succeeded: bool) -> None:
        """One model call: into the V2 statistics always, into the metrics when it succeeded."""
        stats, compute = self.stats, time.monotonic() - started
        waits = [started - r.enqueued_at for r in batch]
        stats.execution_count += 1
        stats.inference_count += items
        stats.compute_count += 1
        stats.compute_ns += int(compute * 1e9)
        stats.queue_count += len(batch)
        stats.queue_ns += int(sum(waits) * 1e9)
        stats.last_inference_ms = int(time.time() * 1000)
        if succeeded and self._metrics is not None:
            self._metrics.compute_duration.observe(compute)
            self._metrics.batch_size.observe(items)
            if self._metrics.engine_batch_size is not None:
                self._metrics.engine_batch_size.observe(items)
            for wait in waits:
                self._metrics.queue_duration.observe(wait)

    def _tally(self, outcomes: list[_Outcome]) -> None:
        """Success and failure counts with their time from enqueue to answer."""
        stats, now = self.stats, time.monotonic()
        for request, outcome in outcomes:
            elapsed = int((now - request.enqueued_at) * 1e9)
            if isinstance(outcome, TorchwireError):
                stats.fail_count += 1
                stats.fail_ns += elapsed
            else:
                stats.success_count += 1
                stats.success_ns += elapsed


_inline = threading.local()


def _one_intra_op_thread() -> None:
    """Inline batches run on one intra-op thread, as their cost was measured: set once on each
    thread that runs them (the loop's, the native front end's, an engine's session threads). A
    thread left with torch's default team would wake (and spin) another thread at every call."""
    if not getattr(_inline, "pinned", False):
        torch.set_num_threads(1)
        _inline.pinned = True


def retry_after(wait_ms: int) -> dict[str, str]:
    """The trailing metadata telling a refused caller when to try again."""
    return {RETRY_AFTER_METADATA: str(wait_ms), RETRY_PUSHBACK_METADATA: str(wait_ms)}


def deliver_here(outcomes: list[_Outcome], loop: asyncio.AbstractEventLoop | None) -> bool:
    """On the thread that computed them: hand each outcome to its ``done`` now, and the ones
    awaited by a future to ``loop`` (None: this is the loop's thread). False if the loop is
    closed."""
    futures = []
    for request, outcome in outcomes:
        if request.done is None:
            futures.append((request, outcome))
        elif not request.dropped:
            try:
                request.done(outcome)
            except Exception:  # the caller's bug must not kill the thread or strand the batch
                log.exception("a request's answer callback failed")
    if not futures:
        return True
    if loop is None:
        _deliver(futures)
        return True
    try:
        loop.call_soon_threadsafe(_deliver, futures)
    except RuntimeError:
        return False
    return True


def _deliver(outcomes: list[_Outcome]) -> None:
    """On the event loop: resolve each caller's future, unless it was cancelled meanwhile."""
    for request, outcome in outcomes:
        future = request.future
        if future is None or future.done():
            continue
        if isinstance(outcome, TorchwireError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _without_frames(exc: ModelExecutionError) -> ModelExecutionError:
    """``exc`` and the exceptions it was raised from, their tracebacks dropped (the message is
    what reaches the caller; the model's own error was logged where it was raised)."""
    for seen in exception_chain(exc):
        seen.__traceback__ = None
    return exc
