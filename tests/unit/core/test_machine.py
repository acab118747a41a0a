"""What the machine can do (machine.py): native bf16 flags, usable and busy cores, torch's thread count."""

import os
import subprocess
import sys

import pytest

from qlora_phi3 import machine


def test_proc_cpuinfo_flags_read_x86_and_arm_lines():
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert "avx512_bf16" in machine._proc_cpuinfo_flags(x86)
    assert "bf16" in machine._proc_cpuinfo_flags(arm)
    assert machine._proc_cpuinfo_flags("nothing here") == set()


def test_cgroup_quota_v2_and_unlimited(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert machine._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert machine._cgroup_quota(tmp_path) is None


def test_usable_cores_is_capped_by_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(machine, "_cgroup_quota", lambda: 1.5)
    assert machine.usable_cores() == 2  # a quota of 1.5 cores still runs two threads part of the time
    monkeypatch.setattr(machine, "_cgroup_quota", lambda: None)
    assert machine.usable_cores() == 4


def test_threads_leave_the_cores_other_processes_keep_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr(machine, "busy_cores", lambda seconds=0.25: 1.0)
    n, why = machine.pick_threads()
    assert n == 1 and "1 of 2" in why
    monkeypatch.setattr(machine, "busy_cores", lambda seconds=0.25: 0.1)
    assert machine.pick_threads()[0] == 2
    monkeypatch.setattr(machine, "busy_cores", lambda seconds=0.25: 7.0)
    assert machine.pick_threads()[0] == 1  # never zero
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert machine.pick_threads() == (3, "OMP_NUM_THREADS")


@pytest.mark.slow  # starts a process
@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_busy_cores_sees_a_spinning_process():
    """A real busy process on one of our cores is counted (the measurement, not a mock)."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert machine.busy_cores(0.5) >= 0.7
    finally:
        spin.kill()
        spin.wait()
