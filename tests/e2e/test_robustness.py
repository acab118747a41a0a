"""Runs that survive: resume after kill -9, atomic checkpoints, NaN guard, OOM advice, Ctrl-C, early errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cpu_dtype
from qlora_phi3.run.checkpoints import is_complete, last_checkpoint

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process

REPO = Path(__file__).resolve().parents[2]
# Small and quick, but with checkpoints, a paged 8-bit optimizer and RNG in play (dropout > 0). No sample answers:
# greedy decoding at both evaluations was a fifth of each run's CPU time, and no test here reads them.
QUICK = ["data.max_samples=160", "train.eval_steps=0", "train.logging_steps=1", "lora.dropout=0.1",
         "train.optimizer=paged_adamw_8bit", "train.micro_batch_size=8", "train.sample_prompts=0"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_phi3", "train", f"train.output_dir={out}", *QUICK, *extra]


def _run(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, *extra), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before the kill point:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _start_and_reach_step(out: Path, step: int, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """Start a run and return once it has logged ``step`` (and the lines read so far)."""
    proc = _start(out, *extra)
    lines: list[str] = []
    marker = f"step {step:>5}"
    _wait_for(lambda: any(marker in ln for ln in lines) or lines.append(proc.stdout.readline()) or False, proc)
    return proc, lines


def _rng(request) -> random.Random:
    """A random source seeded per test and printed, so a failing kill point reproduces:
    QLORA_PHI3_TEST_SEED=<printed seed> pytest tests/e2e/test_robustness.py -k <test>."""
    seed = int(os.environ.get("QLORA_PHI3_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"{request.node.name}: QLORA_PHI3_TEST_SEED={seed}")
    request.node.user_properties.append(("seed", seed))
    return random.Random(seed)


def _adapter(path: Path) -> dict:
    return load_file(path / "adapter" / "adapter_model.safetensors")


def _train(qlora, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The same command as ``_run``, in this process (the ``qlora`` fixture): only the kills need a process."""
    return qlora(*_cmd(out, *extra)[3:])  # _cmd's argv past `python -m qlora_phi3`


def test_kill9_then_resume_equals_uninterrupted_run(tmp_path, request, qlora):
    steps = ["train.max_steps=8", "train.save_steps=2"]
    ref = _train(qlora, tmp_path / "ref", *steps)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = _start(out, *steps)
    kill_after = _rng(request).choice([2, 4])  # a random checkpointed step, at least one checkpoint behind
    _wait_for(lambda: last_checkpoint(out) is not None and int(last_checkpoint(out).name.split("-")[1]) >= kill_after,
              proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # died without a word

    again = _train(qlora, out, *steps)  # neither --resume nor --force: refuse to mix runs
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr

    resumed = _train(qlora, out, *steps, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a, b = _adapter(tmp_path / "ref"), _adapter(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["steps"] == 8
    _assert_whole_history(run, 8)


def _assert_whole_history(run: dict, steps: int) -> None:
    """run.json's history covers the whole run once, across the resumes: step 0's eval, every step's loss (QUICK
    logs each step), the final eval; and the wall time adds up every session's."""
    assert [r["step"] for r in run["history"] if "loss" in r] == list(range(1, steps + 1))
    assert [r["step"] for r in run["history"] if "eval_loss" in r] == [0, steps]
    before = run["resumes"][-1]["wall_seconds_before"]
    assert before > 0 and run["wall_seconds"] > before + run["train_seconds"] * 0.99


def test_kill_during_saves_never_leaves_a_corrupt_latest(tmp_path, request, qlora):
    out = tmp_path / "run"
    rng = _rng(request)
    args = ["train.max_steps=16", "train.save_steps=1", "train.save_total_limit=2"]
    def latest_step() -> int:
        latest = last_checkpoint(out)
        return int(latest.name.split("-")[1]) if latest else 0

    for attempt in range(3):
        before = latest_step()
        proc = _start(out, *args, *(["--resume"] if attempt else []))
        # Wait for this attempt's first new checkpoint (so there is always one to resume from; a kill inside the
        # very first save leaves nothing to resume, which --resume rightly refuses). Saving every step keeps the
        # run inside a save most of the time after it: kill at a random moment there.
        _wait_for(lambda: latest_step() > before, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = last_checkpoint(out)
        if latest is not None:
            assert is_complete(latest)
            load_file(latest / "adapter_model.safetensors")  # readable, not truncated
            state = json.loads((latest / "trainer_state.json").read_text())
            assert state["global_step"] == int(latest.name.split("-")[1])
        assert all(is_complete(p) for p in out.glob("checkpoint-*")), "a partial checkpoint is visible"
    done = _train(qlora, out, *args, "--resume")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(list(out.glob("checkpoint-*"))) <= 2 and not (out / ".staging").exists()
    run = json.loads((out / "run.json").read_text())
    assert len(run["resumes"]) == 3
    _assert_whole_history(run, 16)


def test_nan_guard_stops_at_once_and_keeps_last_good_checkpoint(tmp_path, qlora):
    out = tmp_path / "run"
    # lr=1e30 blows the LoRA weights up after the first update; the next gradients are NaN/inf.
    res = _train(qlora, out, "train.max_steps=20", "train.save_steps=1", "train.lr=1e30", "train.warmup_ratio=0")
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "non-finite" in res.stderr and "at step" in res.stderr and "learning rate" in res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "non-finite" in run["failure"]
    assert 1 <= run["steps"] < 20  # stopped at the step that went bad, not at the end
    latest = last_checkpoint(out)
    assert latest is not None and is_complete(latest)
    weights = load_file(latest / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the kept checkpoint is good
    assert not (out / "adapter").exists()


def test_ctrl_c_once_saves_and_exits_cleanly_then_resumes(tmp_path, qlora):
    out = tmp_path / "run"
    proc, lines = _start_and_reach_step(out, 3, "train.max_steps=8", "train.save_steps=0")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    text = "".join(lines) + output
    assert proc.returncode == 130, text[-2000:]
    assert "Traceback" not in text and "--resume" in text
    latest = last_checkpoint(out)
    assert latest is not None and is_complete(latest)
    first = json.loads((out / "run.json").read_text())
    assert first["status"] == "interrupted" and (out / "loss.png").is_file()
    step = int(latest.name.split("-")[1])
    resumed = _train(qlora, out, "train.max_steps=8", "train.save_steps=0", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 8 > step
    _assert_whole_history(run, 8)
    assert run["resumes"][-1]["wall_seconds_before"] == first["wall_seconds"]


def test_ctrl_c_twice_exits_at_once(tmp_path):
    proc, _ = _start_and_reach_step(tmp_path / "run", 2, "train.max_steps=100000", "train.save_steps=0")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 30
    assert "Traceback" not in output


def test_oom_prints_advice_and_saves_nothing(tmp_path, monkeypatch):
    from qlora_phi3.ui import quiet_library_noise
    from qlora_phi3.config import load_recipe
    from qlora_phi3.errors import RunFailed
    from qlora_phi3.run.train import train

    quiet_library_noise()

    def boom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("transformers.Trainer.train", boom)
    out = tmp_path / "run"
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml",
                         [f"train.output_dir={out}", "data.max_samples=40", "train.micro_batch_size=4",
                          "data.max_seq_len=1024"])
    with pytest.raises(RunFailed) as e:
        train(recipe)
    msg = str(e.value)
    assert "out of GPU memory" in msg
    assert "train.micro_batch_size=2 train.grad_accum=2" in msg and "data.max_seq_len=512" in msg
    assert "gradient_checkpointing=offload" in msg
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "adapter").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("extra,expect", [
    (["lora.r=0"], "'lora.r' must be at least 1"),
    (["train.lr=-1"], "'train.lr' must be positive"),
    (["data.max_seq_len=100000"], "exceeds the model's context of 4096"),
    (["data.path=missing.jsonl"], "file not found"),
    (["lora.rnak=3"], "unknown key 'lora.rnak'"),
    (["train.micro_batch_size=two"], "must be an integer"),
])
def test_recipe_and_flag_errors_are_one_line_before_model_load(tmp_path, extra, expect, qlora, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe error")

    monkeypatch.setattr("qlora_phi3.run.train.load_model", no_model)
    res = _train(qlora, tmp_path / "run", *extra)
    assert res.returncode == 2
    assert expect in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_output_dir_errors(tmp_path, qlora):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _run(blocker / "sub", timeout=120)  # one as a real process: exit code 2 and no traceback
    assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr
    res = _train(qlora, tmp_path / "new", "--resume")
    assert res.returncode == 2 and "nothing to resume" in res.stderr
    res = _train(qlora, tmp_path / "new", "--resume", "--force")
    assert res.returncode == 2 and "contradict" in res.stderr
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    res = _train(qlora, other, "--force")
    assert res.returncode == 2 and (other / "notes.txt").exists()  # --force never deletes a non-run directory


def test_safe_loading_in_source():
    src = "\n".join(p.read_text() for p in (REPO / "qlora_phi3").rglob("*.py"))
    assert "trust_remote_code=True" not in src
    assert "yaml.load(" not in src and "yaml.unsafe_load" not in src
    for line in src.splitlines():
        if "torch.load(" in line:
            assert "weights_only=True" in line, line


def test_pickle_only_model_is_refused(tmp_path):
    from qlora_phi3.config import ModelConfig
    from qlora_phi3.errors import UserError
    from qlora_phi3.model.load import load_model
    from qlora_phi3.model.tiny import TINY_MODEL_DIR

    d = tmp_path / "pickled"
    d.mkdir()
    for f in TINY_MODEL_DIR.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(TINY_MODEL_DIR / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors"):
        load_model(ModelConfig(name_or_path=str(d)), "cpu", cpu_dtype(), "sdpa")


def test_trust_remote_code_warns(tmp_path, qlora):
    res = _train(qlora, tmp_path / "run", "model.trust_remote_code=true", "train.max_steps=1", "train.save_steps=0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "trust_remote_code=true" in res.stdout and "will run on this machine" in res.stdout
