"""Peak memory and speed of a run's steady state: the optimizer steps after a warm-up.

The first steps of a run allocate the optimizer states, build kernels and fill allocator caches, so
they are slow and their memory is a one-off; ``MeasureSteps`` resets the memory peak when step
``warmup + 1`` begins and times every step from there (waiting for the GPU at both ends, so a step's
time is its compute, not its launch). :func:`qlora_phi3.run.train.measure` passes it to the run's setup;
``qlora-phi3 profile`` and the benchmarks read it.
"""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from qlora_phi3.memory.meter import MemoryStats, PeakMemory

__all__ = ["MeasureSteps"]


class MeasureSteps(TrainerCallback):
    def __init__(self, device: str, warmup_steps: int, meter: PeakMemory | None = None, total_steps: int | None = None):
        self.device = device
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps  # the run's max_steps: warm-up plus measured steps
        self.meter = meter  # the trainer's meter, set once it exists
        self.step_seconds: list[float] = []
        self.baseline_gib: float | None = None  # held when measuring began: weights, LoRA, optimizer states
        self.driver_used_gib: float | None = None  # CUDA: the most the driver reported in use at a step's end
        self._t0 = None
        self._tokens0 = 0
        self._tokens = 0

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self._sync()
            self.meter.reset()
            self.baseline_gib = self.meter.current_gib()
            self._tokens0 = state.num_input_tokens_seen
        if state.global_step >= self.warmup_steps:
            self._sync()
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        self._sync()
        self.step_seconds.append(time.perf_counter() - self._t0)
        self._tokens = state.num_input_tokens_seen - self._tokens0
        self._t0 = None
        if self.device.startswith("cuda"):
            # Paged optimizer states live in CUDA managed memory, outside the caching allocator's statistics;
            # the driver's count of used memory (what nvidia-smi shows) includes them while they are resident.
            free, total = torch.cuda.mem_get_info(self.device)
            used = (total - free) / 1024**3
            self.driver_used_gib = max(self.driver_used_gib or 0.0, used)

    def result(self, peak: MemoryStats) -> dict:
        seconds = sum(self.step_seconds)
        return {
            "warmup_steps": self.warmup_steps,
            "steps": len(self.step_seconds),
            "step_seconds": round(seconds / len(self.step_seconds), 4) if self.step_seconds else None,
            "tokens_per_second": round(self._tokens / seconds, 1) if seconds > 0 else None,
            "real_tokens": self._tokens,
            "peak_allocated_gib": round(peak.peak_allocated_gib, 4),
            "peak_reserved_gib": round(peak.peak_reserved_gib, 4),
            "driver_used_gib": None if self.driver_used_gib is None else round(self.driver_used_gib, 3),
            "baseline_gib": None if self.baseline_gib is None else round(self.baseline_gib, 4),
            "memory_measure": peak.measure,
        }
