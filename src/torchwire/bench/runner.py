"""``torchwire bench``: run load processes, show progress, merge and report their measurements."""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue as queue_module
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.live import Live
from rich.text import Text

from torchwire.bench.load import LoadConfig, process_main
from torchwire.bench.stats import Second, new_histogram, summarize

SATURATED_CPU = 0.9  # of one core: above it, a load process is the bottleneck


@dataclass
class RunResult:
    """Everything one run measured, merged over its load processes."""

    config: LoadConfig
    procs: int
    seconds: list[Second] = field(default_factory=list)
    histogram: HdrHistogram = field(default_factory=new_histogram)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_per_proc: list[float] = field(default_factory=list)  # share of one core
    duration_s: float = 0.0
    sent: int = 0

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.seconds)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def qps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    @property
    def client_saturated(self) -> bool:
        return any(cpu > SATURATED_CPU for cpu in self.cpu_per_proc)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "requests": self.ok + self.error_count,
            "ok": self.ok,
            "errors": self.error_count,
            "qps": round(self.qps, 1),
            "items_per_s": round(self.qps * self.config.batch, 1),
            **summarize(self.histogram),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": {**dataclasses.asdict(self.config), "procs": self.procs},
            "summary": self.summary(),
            "errors": dict(self.errors),
            "per_second": [s.as_dict(i) for i, s in enumerate(self.seconds)],
            "client": {
                "procs": self.procs,
                "cpu_per_proc": [round(c, 3) for c in self.cpu_per_proc],
                "cpu_cores": round(sum(self.cpu_per_proc), 3),
                "saturated": self.client_saturated,
            },
        }


def _divide(config: LoadConfig, procs: int) -> list[LoadConfig]:
    configs = []
    for index in range(procs):
        concurrency = config.concurrency // procs + (index < config.concurrency % procs)
        configs.append(
            dataclasses.replace(
                config,
                concurrency=concurrency,
                rate=config.rate / procs,
                seed=config.seed + index,
            )
        )
    return [c for c in configs if c.rate > 0 or c.concurrency > 0]


class _Progress:
    """A live line on a terminal; a plain line every few seconds elsewhere."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self._console = console
        self._live = (
            Live(console=console, transient=True) if enabled and console.is_terminal else None
        )
        self._plain = enabled and not console.is_terminal
        self._last_plain = 0.0

    def __enter__(self) -> _Progress:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, elapsed: float, result: RunResult, label: str) -> None:
        last = result.seconds[-2] if len(result.seconds) >= 2 else None
        qps = last.ok if last else 0
        p99 = (last.histogram.get_value_at_percentile(99) / 1000) if last and last.ok else 0.0
        line = (
            f"{label} {elapsed:5.1f}s  {qps:>7} QPS  P99 {p99:7.2f} ms  errors {result.error_count}"
        )
        if self._live is not None:
            self._live.update(Text(line))
        elif self._plain and time.monotonic() - self._last_plain >= 5:
            self._last_plain = time.monotonic()
            self._console.print(line, highlight=False)


class _Collector:
    """Merges the reports of the load processes into one ``RunResult``."""

    def __init__(self, result: RunResult, console: Console) -> None:
        self.result = result
        self.console = console
        self.cpu: dict[int, float] = {}
        self.failed = 0

    def handle(self, index: int, kind: str, rest: list[Any]) -> None:
        result = self.result
        if kind == "tick":
            second, ok, errors, encoded = rest
            while len(result.seconds) <= second:
                result.seconds.append(Second())
            result.seconds[second].add(ok, errors, encoded)
            result.errors.update(errors)
        elif kind == "done":
            cpu_s, wall_s, sent = rest
            self.cpu[index] = cpu_s / wall_s if wall_s else 0.0
            result.sent += sent
        else:
            self.console.print(f"load process {index} failed: {rest[0]}", highlight=False)
            self.failed += 1
            self.cpu[index] = 0.0

    def finish(self, processes: int) -> RunResult:
        result = self.result
        missing = processes - len(self.cpu) + self.failed
        if missing:
            result.errors["LOAD_PROCESS_FAILED"] += missing
        result.cpu_per_proc = [self.cpu[i] for i in sorted(self.cpu)]
        for second in result.seconds:
            if second.ok:
                result.histogram.add(second.histogram)
        result.duration_s = result.config.duration_s
        return result


def run_load(
    config: LoadConfig,
    procs: int = 1,
    console: Console | None = None,
    progress: bool = True,
    label: str = "",
) -> RunResult:
    """Run ``config`` split over ``procs`` processes; merge what they measured."""
    console = console or Console(stderr=True)
    configs = _divide(config, procs)
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    processes = [
        context.Process(target=process_main, args=(c, reports, i), daemon=True)
        for i, c in enumerate(configs)
    ]
    for process in processes:
        process.start()
    collector = _Collector(RunResult(config, len(processes)), console)
    started = time.monotonic()
    deadline = started + config.warmup_s + config.duration_s + config.timeout_s + 60
    with _Progress(console, progress) as live:
        while len(collector.cpu) < len(processes):
            try:
                index, kind, *rest = reports.get(timeout=0.5)
            except queue_module.Empty:
                if time.monotonic() > deadline or not any(p.is_alive() for p in processes):
                    break
                continue
            collector.handle(index, kind, rest)
            if kind == "tick":
                elapsed = time.monotonic() - started - config.warmup_s
                live.update(elapsed, collector.result, label)
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
    return collector.finish(len(processes))


@dataclass
class SweepStep:
    rate: float
    result: RunResult
    passed: bool


def sweep(
    config: LoadConfig,
    slo_ms: float,
    procs: int = 1,
    start_rate: float = 200.0,
    growth: float = 1.5,
    refinements: int = 3,
    max_rate: float = float("inf"),
    console: Console | None = None,
    progress: bool = True,
) -> list[SweepStep]:
    """Raise the open-loop rate until P99 breaks ``slo_ms`` (or errors appear), then bisect;
    stop rising past ``max_rate``.

    A step passes when P99 < ``slo_ms``, no request failed, and the server kept up (answered at
    least 95 % of the offered rate).
    """
    console = console or Console(stderr=True)
    steps: list[SweepStep] = []

    def step(rate: float) -> bool:
        result = run_load(
            dataclasses.replace(config, rate=rate, concurrency=0),
            procs,
            console,
            progress,
            label=f"rate {rate:,.0f}/s",
        )
        p99 = result.histogram.get_value_at_percentile(99) / 1000 if result.ok else float("inf")
        passed = result.error_count == 0 and p99 < slo_ms and result.qps >= 0.95 * rate
        steps.append(SweepStep(rate, result, passed))
        verdict = "pass" if passed else "fail"
        console.print(
            f"  rate {rate:>8,.0f}/s -> {result.qps:>8,.0f} QPS, P99 {p99:8.2f} ms, "
            f"errors {result.error_count}: {verdict}",
            highlight=False,
        )
        return passed

    good, bad = 0.0, 0.0
    rate = start_rate
    while rate <= max_rate:
        if step(rate):
            good = rate
            rate *= growth
        else:
            bad = rate
            break
    if good and bad:
        for _ in range(refinements):
            middle = (good + bad) / 2
            if step(middle):
                good = middle
            else:
                bad = middle
    return steps


def best_step(steps: list[SweepStep]) -> SweepStep | None:
    passed = [s for s in steps if s.passed]
    return max(passed, key=lambda s: s.result.qps) if passed else None
