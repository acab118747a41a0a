"""What this machine can do, asked rather than assumed: native bf16 on the CPU, and the cores actually free
to this process (affinity, cgroup quota, other busy processes).

Why it matters: a CPU without AVX512-BF16 or AMX (an AVX2-only EPYC, most laptops before 2023) emulates
bf16 matmuls, about 10x slower than fp32 for the same loss (measured on the tiny default run: 315 vs 3,140
tokens/s); and on a 2-core box two torch threads beside one other busy process spin against each other
(0.32x of alone, while one thread does 0.72x).
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

__all__ = ["busy_cores", "cpu_bf16", "cpu_flags", "onednn_isa_cap", "pick_threads", "usable_cores"]

# Flags that mean bf16 matmuls run in hardware. x86: AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4+) or AMX
# (Sapphire Rapids+); ARM: the BF16 extension (ARMv8.6: Graviton 3, Apple M2+, Neoverse V1/N2).
_NATIVE_BF16 = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "bf16": "ARM BF16", "sve_bf16": "SVE BF16"}


def _torch_capabilities() -> dict | None:
    """torch's own CPU feature probe (``torch.cpu.get_capabilities``, torch >= 2.10), or None where it has none."""
    try:
        import torch

        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError, ImportError):
        return None


def _proc_cpuinfo_flags(text: str | None = None) -> set[str]:
    """Flags from /proc/cpuinfo ('flags' on x86, 'Features' on ARM); empty where there is no such file."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_flags() -> dict[str, bool]:
    """The bf16-related CPU flags, from torch where it can tell, else from /proc/cpuinfo, else from macOS sysctl."""
    caps = _torch_capabilities()
    if caps is not None:
        return {flag: bool(caps.get(flag, False)) for flag in _NATIVE_BF16}
    flags = _proc_cpuinfo_flags()
    if not flags and platform.system() == "Darwin":
        flags = {"bf16"} if _sysctl("hw.optional.arm.FEAT_BF16") == "1" else set()
    return {flag: flag in flags for flag in _NATIVE_BF16}


def _sysctl(name: str) -> str | None:
    import subprocess

    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# oneDNN's x86 ISA levels, lowest first (its docs, "CPU dispatcher control"). torch's CPU matmuls run in oneDNN,
# so a cap below AVX512_CORE_BF16 emulates bf16 whatever the CPU has. Measured on the Xeon with avx512_bf16, a
# 512x1024 @ 1024x1024 matmul: bf16 7.8 ms uncapped, 20 ms at AVX512_CORE, 1,400 ms at AVX2 (fp32: 4.7-5.5 ms).
# ATEN_CPU_CAPABILITY changes nothing there (it picks torch's own elementwise kernels), so it is not asked.
_ONEDNN_ISAS = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"]
_ONEDNN_BF16_FROM = _ONEDNN_ISAS.index("AVX512_CORE_BF16")


def onednn_isa_cap() -> str | None:
    """The oneDNN ISA cap set in the environment (ONEDNN_MAX_CPU_ISA, or its old name DNNL_MAX_CPU_ISA) when it
    keeps bf16 matmuls off their native kernels; None when there is no such cap."""
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(var, "").strip().upper()
        if value:
            # DEFAULT, ALL and names this list does not know (newer levels) leave bf16 alone.
            if value in _ONEDNN_ISAS and _ONEDNN_ISAS.index(value) < _ONEDNN_BF16_FROM:
                return f"{var}={value}"
            return None
    return None


def cpu_bf16(flags: dict[str, bool] | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the words that say why (printed, and kept in run.json).
    Native means the CPU has the instructions and torch's matmul library (oneDNN) may use them."""
    flags = cpu_flags() if flags is None else flags
    have = [name for flag, name in _NATIVE_BF16.items() if flags.get(flag)]
    cap = onednn_isa_cap()
    if have and cap:
        return False, (f"CPU has native bf16 ({', '.join(have)}) but {cap} keeps torch's matmuls (oneDNN) off it: "
                       "bf16 would be emulated, about 10x slower, so fp32")
    if have:
        return True, f"CPU has native bf16 ({', '.join(have)})"
    return False, ("CPU has no native bf16 (no AVX512-BF16, AMX or ARM BF16): bf16 would be emulated, about 10x "
                   "slower, so fp32")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers, CI)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU quota in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int] | None) -> tuple[float, float]:
    """(busy, total) jiffies summed over ``cpus`` (all when None), from /proc/stat."""
    busy = total = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return busy, total


def busy_cores(seconds: float = 0.25) -> float:
    """How many of this process's cores other processes keep busy right now (this process sleeps while it
    samples /proc/stat). Not the load average: it lags a minute, so a run started right after another
    would see a busy machine that is in fact idle. 0 where /proc/stat cannot be read."""
    import time

    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = None
    try:
        b0, t0 = _cpu_times(cpus)
        time.sleep(seconds)
        b1, t1 = _cpu_times(cpus)
    except (OSError, ValueError):
        return 0.0
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    return 0.0 if t1 <= t0 else n * (b1 - b0) / (t1 - t0)


def pick_threads() -> tuple[int, str]:
    """torch's intra-op thread count for training on the CPU: OMP_NUM_THREADS if set, else the usable cores
    that no other process keeps busy (at least one).

    torch defaults to every physical core of the machine, ignoring affinity, quotas and other processes;
    on a shared box its spinning threads then fight for the busy core (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    usable = usable_cores()
    busy = busy_cores()
    free = max(1, min(usable, usable - int(busy + 0.5)))
    if free < usable:
        return free, f"{free} of {usable} usable cores free: other processes keep {busy:.1f} busy"
    return usable, f"{usable} usable {'core' if usable == 1 else 'cores'} (affinity and cgroup quota), none busy"
