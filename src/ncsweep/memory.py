"""Peak memory of a training phase: CUDA allocator peaks on a GPU, the process's peak RSS else."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class PeakMemory:
    """What one measurement saw; ``kind`` says which figure ``bytes`` is."""

    bytes: int
    kind: str
    reserved_bytes: int | None = None


def reset_peak(device: torch.device) -> bool:
    """Start a new peak window; returns False where the OS keeps only a lifetime peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def read_peak(device: torch.device) -> PeakMemory:
    """The peak since the last reset: CUDA allocated (and reserved), or peak RSS of the process."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device), "cuda_max_allocated",
                          torch.cuda.max_memory_reserved(device))
    hwm = _vm_hwm()
    if hwm is not None:
        return PeakMemory(hwm, "cpu_peak_rss")
    scale = 1 if sys.platform == "darwin" else 1024
    return PeakMemory(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                      "cpu_peak_rss_lifetime")


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
