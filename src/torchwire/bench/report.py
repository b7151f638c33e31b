"""What ``torchwire bench`` shows and writes: a table, a JSON file, a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from torchwire.bench.runner import RunResult, SweepStep, best_step
from torchwire.bench.stats import PERCENTILES


def print_result(console: Console, result: RunResult) -> None:
    summary = result.summary()
    table = Table(title="torchwire bench", title_justify="left")
    for column in (
        "requests",
        "ok",
        "errors",
        "QPS",
        *(f"P{p:g} ms" for p in PERCENTILES),
        "max ms",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{summary['requests']:,}",
        f"{summary['ok']:,}",
        f"{summary['errors']:,}",
        f"{summary['qps']:,.1f}",
        *(f"{summary[f'p{p:g}_ms']:.2f}" for p in PERCENTILES),
        f"{summary['max_ms']:.2f}",
    )
    console.print(table)
    if result.errors:
        errors = ", ".join(f"{code}: {count:,}" for code, count in sorted(result.errors.items()))
        console.print(f"errors by status: {errors}", highlight=False)
    cores = sum(result.cpu_per_proc)
    console.print(
        f"client: {result.procs} process(es) using {cores:.2f} cores "
        f"({', '.join(f'{c:.0%}' for c in result.cpu_per_proc)} of a core each)",
        highlight=False,
    )
    if result.client_saturated:
        console.print(
            "[yellow]warning: a load process used over 90% of a core: the client may be the "
            "bottleneck; add --procs[/yellow]"
        )


def print_sweep(console: Console, steps: list[SweepStep], slo_ms: float) -> None:
    table = Table(title=f"sweep: highest QPS with P99 < {slo_ms:g} ms", title_justify="left")
    for column in ("offered/s", "QPS", "P50 ms", "P99 ms", "errors", "client cores", "pass"):
        table.add_column(column, justify="right")
    for step in sorted(steps, key=lambda s: s.rate):
        summary = step.result.summary()
        table.add_row(
            f"{step.rate:,.0f}",
            f"{summary['qps']:,.1f}",
            f"{summary['p50_ms']:.2f}",
            f"{summary['p99_ms']:.2f}",
            f"{summary['errors']:,}",
            f"{sum(step.result.cpu_per_proc):.2f}",
            "yes" if step.passed else "no",
        )
    console.print(table)
    best = best_step(steps)
    if best is None:
        console.print(f"no rate kept P99 under {slo_ms:g} ms without errors")
    else:
        console.print(
            f"highest QPS at P99 < {slo_ms:g} ms: {best.result.qps:,.0f} "
            f"(offered {best.rate:,.0f}/s, P99 {best.result.summary()['p99_ms']:.2f} ms)",
            highlight=False,
        )


def sweep_dict(steps: list[SweepStep], slo_ms: float) -> dict[str, Any]:
    best = best_step(steps)
    return {
        "slo_ms": slo_ms,
        "best_qps": round(best.result.qps, 1) if best else None,
        "steps": [{"rate": s.rate, "passed": s.passed, **s.result.as_dict()} for s in steps],
    }


def sweep_summary(steps: list[SweepStep]) -> dict[str, Any]:
    """The best rate under the target and each step in a line: for benchmark tables."""
    best = best_step(steps)
    return {
        "qps": round(best.result.qps, 1) if best else 0.0,
        "p99_ms": best.result.summary()["p99_ms"] if best else None,
        "steps": [
            {"rate": s.rate, "qps": round(s.result.qps, 1), "passed": s.passed,
             "p99_ms": s.result.summary()["p99_ms"], "errors": s.result.error_count}
            for s in steps
        ],
    }  # fmt: skip


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def plot(path: Path, result: RunResult) -> None:
    """Latency percentiles over time, and the latency distribution (percentile curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [s.as_dict(i) for i, s in enumerate(result.seconds)]
    figure, (over_time, distribution) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [s["second"] for s in seconds]
    for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        over_time.plot(xs, [s[key] for s in seconds], label=key.removesuffix("_ms").upper())
    over_time.set(xlabel="second", ylabel="latency (ms)", title="latency over time")
    over_time.legend()
    qps_axis = over_time.twinx()
    qps_axis.plot(xs, [s["ok"] for s in seconds], color="grey", alpha=0.3, label="QPS")
    qps_axis.set_ylabel("answers per second")
    percentiles = [p for p in (1, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100)]
    values = [result.histogram.get_value_at_percentile(p) / 1000 for p in percentiles]
    distribution.plot(range(len(percentiles)), values, marker="o")
    distribution.set_xticks(range(len(percentiles)), [f"{p:g}" for p in percentiles])
    distribution.set(xlabel="percentile", ylabel="latency (ms)", title="latency distribution")
    if any(v > 0 for v in values):
        distribution.set_yscale("log")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
