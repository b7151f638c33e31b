"""``torchwire bench``: closed- and open-loop load, HDR percentiles, sweeps to a latency target."""

from torchwire.bench.load import LoadConfig
from torchwire.bench.runner import RunResult, SweepStep, run_load, sweep

__all__ = ["LoadConfig", "RunResult", "SweepStep", "run_load", "sweep"]
