"""What the GPUs this process computes on hold: its memory, the device's, and (where NVML is
installed, ``nvidia-ml-py``) their utilisation. Read by the memory watchdog for metrics and health.

Only devices this process already uses are read: a CPU-only server never initialises CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchwire.metrics import Metrics


@dataclass(frozen=True)
class GpuReading:
    """One device, as this process sees it."""

    device: str
    """``cuda:N``."""
    used_bytes: int
    """Held by this process's tensors."""
    reserved_bytes: int
    """Held by this process's caching allocator (used, plus cached for reuse)."""
    total_bytes: int
    free_bytes: int
    """Free on the device, whoever else uses it."""
    utilization: float | None = None
    """Fraction of the last sample period a kernel ran (NVML), None without NVML."""

    @property
    def available_bytes(self) -> int:
        """What this process can still allocate: free on the device plus its own cache."""
        return self.free_bytes + self.reserved_bytes - self.used_bytes


def read_gpus() -> list[GpuReading]:
    """A reading of every CUDA device this process has allocated memory on (ever: a device
    whose models were unloaded still reads, at 0 used)."""
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return []  # (is_available() would start CUDA's driver in a CPU-only server)
    readings = []
    for index in range(torch.cuda.device_count()):
        if not torch.cuda.max_memory_reserved(index):
            continue  # never used here: reading it would create a CUDA context on it
        reserved = torch.cuda.memory_reserved(index)
        free, total = torch.cuda.mem_get_info(index)
        readings.append(
            GpuReading(
                device=f"cuda:{index}",
                used_bytes=torch.cuda.memory_allocated(index),
                reserved_bytes=reserved,
                total_bytes=total,
                free_bytes=free,
                utilization=_utilization(index),
            )
        )
    return readings


def _utilization(index: int) -> float | None:
    try:
        return torch.cuda.utilization(index) / 100
    except Exception:  # no nvidia-ml-py (ModuleNotFoundError), or NVML refuses
        return None


def observe_gpus(metrics: Metrics, readings: list[GpuReading]) -> None:
    """Set the GPU gauges from ``readings``."""
    for gpu in readings:
        metrics.gpu_memory_used.labels(gpu.device).set(gpu.used_bytes)
        metrics.gpu_memory_reserved.labels(gpu.device).set(gpu.reserved_bytes)
        metrics.gpu_memory_total.labels(gpu.device).set(gpu.total_bytes)
        metrics.gpu_memory_free.labels(gpu.device).set(gpu.free_bytes)
        if gpu.utilization is not None:
            metrics.gpu_utilization.labels(gpu.device).set(gpu.utilization)
