"""bench/gpu_check.py, the one script that checks what only a GPU can show: every step runs on the CPU with tiny
sizes (--dry-run), so the script is known to work before a GPU is lent for it."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_each_result_as_it_goes(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                          "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    report = (tmp_path / "dry-run-cpu.md").read_text()
    assert res.returncode == 0, report[-3000:] + res.stderr[-2000:]
    for step in ("build", "train", "dpo", "phi4", "phi4_14b", "grpo", "grpo_vllm", "packing", "fp16", "grid", "long",
                 "merge", "eval", "speed"):
        assert f"## {step} (" in report, step  # each step's section, none FAILED or skipped
    assert "DRY RUN" in report and "0 step(s) failed" in report
    packing = next(line for line in report.splitlines() if line.startswith("packed vs alone"))
    diffs = [float(part.rsplit(" ", 1)[1]) for part in packing.split(": ", 1)[1].split("; ")]
    assert len(diffs) == 2 and max(diffs) < 0.05  # 1 and 2 rows per micro-batch: no sample sees another
    long = next(line for line in report.splitlines() if line.startswith("phi3_mini_128k_12gb at"))
    assert "256 tokens, tiles of 64" in long and "estimated reserved" in long  # the tiled path ran, beside its estimate
    dpo = next(line for line in report.splitlines() if line.startswith("phi3_mini_4k_12gb_dpo at"))
    assert "128 tokens per row" in dpo and "status completed, 2 steps" in dpo and "estimated reserved" in dpo
    phi4 = next(line for line in report.splitlines() if line.startswith("phi4_mini_12gb at"))
    assert "128 tokens" in phi4 and "6/2 heads" in phi4 and "vocabulary 200,064, tied True" in phi4
    grpo = next(line for line in report.splitlines() if line.startswith("phi4_mini_12gb_grpo at"))
    assert "status completed, 2 steps" in grpo and "estimated reserved" in grpo
    assert "status completed" in phi4 and "estimated reserved" in phi4
    assert "not run: a dry run has no CUDA" in report  # grpo_vllm says why it did not run, never a silent skip
    evaluated = next(line for line in report.splitlines() if line.startswith("`qlora-phi3 eval` at"))
    assert "256 tokens per row, batch 2" in evaluated and "base" in evaluated and "fine-tune" in evaluated
    speed = next(line for line in report.splitlines() if line.startswith("one pass over"))
    assert "reference: " in speed and "ours: " in speed and "ours / reference" in speed  # both pipelines, a ratio
    phi4_14b = next(line for line in report.splitlines() if line.startswith("phi4_12gb at"))
    assert "random Phi-4 " in phi4_14b and "4/1 heads" in phi4_14b and "vocabulary 100,352, tied False" in phi4_14b
    assert "status completed" in phi4_14b and "estimated reserved" in phi4_14b
