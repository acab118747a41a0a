"""Peak memory, measured the same way wherever it is reported (progress display, run.json, profiler).

CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` since the last ``reset()``, and
the driver's view of used memory (what ``nvidia-smi`` shows, including the CUDA context).

CPU: the peak of **live tensor storage bytes** since ``reset()``. PyTorch's CPU allocator keeps no
statistics, and the process RSS is noisy (glibc/allocator caching, Python, library code and data),
so we count tensors instead, like ``torch.cuda.memory_allocated`` counts them on a GPU:

* at ``reset()`` every tensor reachable by Python's garbage collector (model weights, 4-bit packed
  weights and their quantization constants, LoRA weights, optimizer states, ...) is counted once per
  storage (views share a storage);
* from then on a ``TorchDispatchMode`` sees every tensor an operator returns (and every tensor it is
  given, which catches tensors made outside the mode, e.g. batches) and adds its storage's bytes;
  a weak reference on the storage subtracts them when the storage is freed. Autograd's saved
  activations, gradients, the bf16 autocast copies of fp32 LoRA weights, bitsandbytes' dequantized
  weights in backward and the logits are all operator outputs, so they are counted while they live.

What it cannot see: buffers an operator allocates and frees internally (e.g. the 4-bit weight that
bitsandbytes' CPU ``gemm_4bit`` kernel unpacks inside the forward op, attention kernel scratch). These
are small next to the counted terms and the same for every configuration, so CPU figures from
different configurations compare fairly; they are not RSS. ``process_rss_gib`` is reported beside
them for reference. The dispatch mode costs a few microseconds per operator (measured: see
tests/unit/run/test_profile.py), negligible next to real CPU training steps.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import asdict, dataclass

from qlora_phi3.units import gib

__all__ = ["LiveTensorTracker", "MemoryStats", "PeakMemory"]

@dataclass
class MemoryStats:
    device: str
    peak_allocated_gib: float  # CUDA: max_memory_allocated; CPU: peak live tensor bytes
    peak_reserved_gib: float  # CUDA: max_memory_reserved; CPU: same as allocated (no caching pool is counted)
    driver_used_gib: float | None = None  # CUDA only: what nvidia-smi would show for the whole GPU
    process_rss_gib: float | None = None  # CPU only: resident set size at read time, for reference
    measure: str = "allocator"  # "allocator" (CUDA), "tensors" or "rss" (CPU): what the peak fields mean

    def __post_init__(self):
        if self.device == "cpu" and self.measure == "allocator":
            self.measure = "tensors"

    def as_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        if self.device == "cpu":
            return f"{self.peak_allocated_gib:.3f} GiB {'process RSS' if self.measure == 'rss' else 'live tensors'}"
        return f"{self.peak_allocated_gib:.2f}/{self.peak_reserved_gib:.2f} GiB CUDA alloc/reserved"

    def explained(self) -> str:
        """:meth:`short` and how it relates to the other figures (docs/memory.md, "Which memory")."""
        if self.device == "cpu" and self.measure == "rss":
            return (f"{self.short()} (the whole process: live tensors, what `estimate` and `profile` count on a "
                    "CPU, plus the Python runtime, libraries, data and allocator caches)")
        if self.device == "cpu":
            return f"{self.short()} (every tensor storage while it lives, what `estimate` predicts on a CPU)"
        used = "" if self.driver_used_gib is None else f"; driver used {self.driver_used_gib:.2f} GiB"
        return f"{self.short()} (reserved + the CUDA context = driver used, what `estimate` predicts{used})"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_tracker_class():
    """Defined lazily so that importing this module does not import torch."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Tracker(TorchDispatchMode):
        def __init__(self, owner: "LiveTensorTracker"):
            super().__init__()
            self.owner = owner

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            track = self.owner.track
            # Inputs first (tensors born outside the mode), then outputs; only top level and flat lists:
            # a full pytree walk per operator would cost more than everything else here.
            for group in (args, (out,)):
                for a in group:
                    if isinstance(a, torch.Tensor):
                        track(a)
                    elif isinstance(a, (list, tuple)):
                        for b in a:
                            if isinstance(b, torch.Tensor):
                                track(b)
            return out

    return _Tracker


class LiveTensorTracker:
    """Counts bytes of live CPU tensor storages; ``peak_bytes`` is the maximum since ``reset()``."""

    def __init__(self):
        self._live: dict[int, tuple[int, object]] = {}  # storage data_ptr -> (nbytes, weakref)
        self.current_bytes = 0
        self.peak_bytes = 0
        self._mode = None

    def track(self, tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta / sparse / wrapper tensors: no CPU bytes of their own
            return
        if storage.device.type != "cpu":
            return
        key = storage.data_ptr()
        if key in self._live or key == 0:
            return
        n_bytes = storage.nbytes()
        # Storages keep their Python object alive while the C++ storage lives (PyObject preservation), so
        # the callback fires exactly when the memory is freed.
        ref = weakref.ref(storage, lambda _r, k=key: self._free(k, _r))
        self._live[key] = (n_bytes, ref)
        self.current_bytes += n_bytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes

    def _free(self, key: int, ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] is ref:
            del self._live[key]
            self.current_bytes -= entry[0]

    def scan(self) -> None:
        """Count every tensor the garbage collector can reach (weights, states): the baseline."""
        import gc
        import warnings

        import torch

        with warnings.catch_warnings():  # isinstance() on some lazy module attributes warns about deprecations
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    self.track(obj)

    def reset(self) -> None:
        """Start a new peak at the memory live now (rescanned, so nothing made outside the mode is missed)."""
        self.scan()
        self.peak_bytes = self.current_bytes

    def start(self) -> None:
        if self._mode is None:
            self._mode = _make_tracker_class()(self)
            self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def __enter__(self):
        self.start()
        self.reset()
        return self

    def __exit__(self, *exc):
        self.stop()


class PeakMemory:
    """Peak memory of one phase: ``reset()`` at its start, ``read()`` whenever needed, ``close()`` at the end.

    On CPU ``reset()`` starts the live-tensor tracker on the calling thread (the training thread); it
    stays active until ``close()``.
    """

    def __init__(self, device: str, cpu_measure: str = "tensors"):
        """
        Args:
            device: "cpu" or a CUDA device.
            cpu_measure: on CPU, "tensors" (the live-tensor peak above: exact, but the dispatch mode costs
                Python time on every operator, ~2.6x CPU time on the tiny model's small ops; what the profiler
                and estimator validation use) or "rss" (peak resident set size sampled every 10 ms by a
                thread: near-free, what CPU training shows). On CUDA both read the allocator's statistics.
        """
        if cpu_measure not in ("tensors", "rss"):
            raise ValueError(f"cpu_measure must be 'tensors' or 'rss', got {cpu_measure!r}")
        self.device = device
        self.cpu_measure = cpu_measure
        self._tracker = LiveTensorTracker() if device == "cpu" and cpu_measure == "tensors" else None
        self._rss = _RssSampler() if device == "cpu" and cpu_measure == "rss" else None

    def reset(self) -> None:
        if self._tracker is not None:
            self._tracker.start()
            self._tracker.reset()
            return
        if self._rss is not None:
            self._rss.reset()
            return
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def current_gib(self) -> float:
        """Memory held now (CPU: live tensors; CUDA: memory_allocated): the leak check between phases."""
        if self._tracker is not None:
            self._tracker.scan()
            return gib(self._tracker.current_bytes)
        if self._rss is not None:
            return gib(_rss_bytes())
        import torch

        torch.cuda.synchronize(self.device)
        return gib(torch.cuda.memory_allocated(self.device))

    def read(self) -> MemoryStats:
        if self._tracker is not None:
            peak = gib(self._tracker.peak_bytes)
            return MemoryStats("cpu", peak, peak, process_rss_gib=gib(_rss_bytes()))
        if self._rss is not None:
            peak = gib(self._rss.peak_bytes())
            return MemoryStats("cpu", peak, peak, process_rss_gib=peak, measure="rss")
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryStats(self.device, gib(torch.cuda.max_memory_allocated(self.device)),
                           gib(torch.cuda.max_memory_reserved(self.device)), gib(total - free))

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.stop()
        if self._rss is not None:
            self._rss.stop()


class _RssSampler:
    """Peak resident set size since ``reset()``, sampled every ``interval_s`` by a daemon thread."""

    def __init__(self, interval_s: float = 0.01):
        import threading

        self._interval_s = interval_s
        self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="qlora-phi3-rss")
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def reset(self) -> None:
        self._peak = _rss_bytes()

    def peak_bytes(self) -> int:
        self._peak = max(self._peak, _rss_bytes())
        return self._peak

    def stop(self) -> None:
        self._stop.set()
