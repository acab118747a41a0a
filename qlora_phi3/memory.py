"""Peak memory, measured the same way wherever it is reported (progress display, run.json, profiler).

CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` since the last ``reset()``, and
the driver's view of used memory (what ``nvidia-smi`` shows, including the CUDA context).
CPU: the process's peak resident set size since ``reset()``, sampled by a background thread every
``interval_s`` (PyTorch's CPU allocator keeps no statistics); it includes the Python runtime and
libraries, so compare CPU figures only with each other.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass

__all__ = ["MemoryStats", "PeakMemory", "gib"]

GIB = 1024**3


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


@dataclass
class MemoryStats:
    device: str
    peak_allocated_gib: float  # CUDA: tensors; CPU: peak RSS
    peak_reserved_gib: float  # CUDA: caching allocator; CPU: peak RSS
    driver_used_gib: float | None = None  # CUDA only: what nvidia-smi would show for the whole GPU

    def as_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        if self.device == "cpu":
            return f"{self.peak_reserved_gib:.2f} GiB RSS"
        return f"{self.peak_allocated_gib:.2f}/{self.peak_reserved_gib:.2f} GiB alloc/reserved"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of one phase: ``reset()`` at its start, ``read()`` whenever needed."""

    def __init__(self, device: str, interval_s: float = 0.01):
        self.device = device
        self._interval_s = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread = None
        if device == "cpu":
            self._thread = threading.Thread(target=self._sample, daemon=True, name="qlora-phi3-rss")
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def reset(self) -> None:
        if self.device == "cpu":
            self._peak = _rss_bytes()
        else:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> MemoryStats:
        if self.device == "cpu":
            self._peak = max(self._peak, _rss_bytes())
            return MemoryStats("cpu", gib(self._peak), gib(self._peak))
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryStats(self.device, gib(torch.cuda.max_memory_allocated(self.device)),
                           gib(torch.cuda.max_memory_reserved(self.device)), gib(total - free))

    def close(self) -> None:
        self._stop.set()
