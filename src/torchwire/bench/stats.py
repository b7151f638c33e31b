"""Latency statistics: HDR histograms (µs, 3 significant digits), overall and per second."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

MAX_LATENCY_US = 120_000_000  # two minutes
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


def decode(encoded: bytes) -> HdrHistogram:
    histogram = new_histogram()
    if encoded:
        histogram.decode_and_add(encoded)
    return histogram


def summarize(histogram: HdrHistogram) -> dict[str, float]:
    """Percentiles and max in milliseconds."""
    if histogram.get_total_count() == 0:
        return {**{f"p{p:g}_ms": 0.0 for p in PERCENTILES}, "max_ms": 0.0, "mean_ms": 0.0}
    result = {f"p{p:g}_ms": histogram.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    result["max_ms"] = histogram.get_max_value() / 1000
    result["mean_ms"] = histogram.get_mean_value() / 1000
    return result


@dataclass
class Second:
    """What happened in one second of a run (summed over the load processes)."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    histogram: HdrHistogram = field(default_factory=new_histogram)

    def add(self, ok: int, errors: dict[str, int], encoded: bytes) -> None:
        self.ok += ok
        self.errors.update(errors)
        if encoded:
            self.histogram.decode_and_add(encoded)

    def as_dict(self, index: int) -> dict[str, Any]:
        return {
            "second": index,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            **summarize(self.histogram),
        }


@dataclass
class Recorder:
    """One load process's measurements: the current second and the errors by status."""

    histogram: HdrHistogram = field(default_factory=new_histogram)
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def record(self, latency_s: float) -> None:
        self.ok += 1
        self.histogram.record_value(min(max(1, int(latency_s * 1e6)), MAX_LATENCY_US))

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def take(self) -> tuple[int, dict[str, int], bytes]:
        """This second's counts and encoded histogram; start the next second."""
        taken = (self.ok, dict(self.errors), self.histogram.encode() if self.ok else b"")
        self.histogram, self.ok, self.errors = new_histogram(), 0, Counter()
        return taken
