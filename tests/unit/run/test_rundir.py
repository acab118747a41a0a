"""The run directory (run/rundir.py): --resume continues the run as it was started, a run that fails early
leaves nothing behind, and saved paths work from any folder."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qlora_phi3.config import load_recipe
from qlora_phi3.model.tiny import TINY_MODEL_DIR
from qlora_phi3.run.record import ADAPTER_META

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process

QUICK = ["data.max_samples=40", "data.max_eval_samples=4", "train.eval_steps=0", "train.logging_steps=1",
         "train.micro_batch_size=8", "train.sample_prompts=0"]


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


def test_resume_continues_with_the_runs_own_settings_and_refuses_changes(tmp_path, qlora):
    run = tmp_path / "run"
    _ok(qlora("train", *QUICK, "train.max_steps=4", "train.save_steps=2", "lora.r=8", f"train.output_dir={run}"))
    # The resume command carries none of the original overrides: they come from the run's recipe.yaml.
    for changed, expect in ((["lora.r=4"], "lora.r: run has 8, asked 4"),
                            (["data.max_seq_len=64"], "data.max_seq_len: run has 128, asked 64"),
                            (["train.max_steps=3"], "train.max_steps: run has 4, asked 3")):
        res = qlora("train", "--resume", str(run), *changed)
        assert res.returncode == 2 and expect in res.stderr and "Traceback" not in res.stderr, res.stderr
    _ok(qlora("train", "--resume", str(run), "train.max_steps=6"))
    # A completed run has nothing to resume: no step past max_steps, nothing rewritten; the message says how to
    # train it longer. A new run into it is told the same.
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    res = qlora("train", "--resume", str(run))
    assert res.returncode == 2 and "is completed (6 optimizer steps" in res.stderr, res.stderr
    assert f"--resume {run} train.max_steps=12" in res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    res = qlora("train", *QUICK, f"train.output_dir={run}")
    assert res.returncode == 2 and "already holds a completed run" in res.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 6
    assert record["recipe"]["lora"]["r"] == 8 and record["recipe"]["data"]["max_samples"] == 40
    assert record["resumes"] == [{"from": "checkpoint-4", "changes": {"train.max_steps": [4, 6]},
                                  "wall_seconds_before": record["resumes"][0]["wall_seconds_before"]}]
    assert 0 < record["resumes"][0]["wall_seconds_before"] < record["wall_seconds"]
    saved = load_recipe(run / "recipe.yaml", [])
    assert saved.train.max_steps == 6 and saved.lora.r == 8


def test_a_run_that_fails_before_training_writes_nothing(tmp_path, qlora):
    run = tmp_path / "run"
    res = qlora("train", *QUICK, "lora.target_modules=q_proj", f"train.output_dir={run}")
    assert res.returncode == 2 and "qkv_proj" in res.stderr  # refused after the model loaded
    assert not run.exists()  # not even an empty directory
    csv = tmp_path / "chats.csv"
    csv.write_text("prompt,answer\nhi,hello\n")
    res = qlora("train", *QUICK, f"data.path={csv}", f"train.output_dir={tmp_path / 'a' / 'b'}")
    assert res.returncode == 2 and not (tmp_path / "a").exists()
    again = qlora("train", *QUICK, "lora.target_modules=q_proj", f"train.output_dir={run}")
    assert "already holds a run" not in again.stderr


def test_resume_without_a_checkpoint_says_so_and_a_new_run_takes_the_directory(tmp_path, qlora):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"train": {"output_dir": str(run)}}))
    (run / "run.json").write_text(json.dumps({"status": "interrupted", "steps": 3}))
    res = qlora("train", "--resume", str(run))
    assert res.returncode == 2 and "nothing to resume" in res.stderr and "no complete checkpoint" in res.stderr
    assert "'interrupted' at step 3" in res.stderr
    res = _ok(qlora("train", *QUICK, "train.max_steps=1", "train.save_steps=0", f"train.output_dir={run}"))
    assert "replacing the earlier run" in res.stdout
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_relative_paths_are_saved_absolute_so_chat_works_from_another_folder(tmp_path, qlora):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(TINY_MODEL_DIR, work / "my-phi3")
    _ok(qlora("train", *QUICK, "train.max_steps=1", "train.save_steps=0", "model.name_or_path=my-phi3",
               "train.output_dir=run", cwd=work))
    saved = load_recipe(work / "run" / "recipe.yaml", [])
    assert saved.model.name_or_path == str(work / "my-phi3")
    meta = json.loads((work / "run" / "adapter" / ADAPTER_META).read_text())
    assert meta["base_model"] == str(work / "my-phi3")
    res = _ok(qlora("chat", str(work / "run"), "--prompt", "What is 1 plus 1?", "--max-new-tokens", "4",
                     cwd=elsewhere))
    assert res.stdout.strip()
    # --base: the same model from another place is accepted; a different one is refused by its shapes.
    moved = tmp_path / "moved-phi3"
    shutil.move(str(work / "my-phi3"), moved)
    res = qlora("chat", str(work / "run"), "--prompt", "hi", "--max-new-tokens", "2", cwd=elsewhere)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    _ok(qlora("chat", str(work / "run"), "--base", str(moved), "--prompt", "hi", "--max-new-tokens", "2",
               cwd=elsewhere))
    assert Path(moved).is_dir()


def test_the_writability_probe_holds_when_processes_of_one_launch_probe_at_once(tmp_path):
    """torchrun starts every rank on the same train.output_dir: each probes it, and none may fail because another
    removed its probe file or the folder it made for its probe (a DDP run failed so in CI)."""
    import threading

    from qlora_phi3.run.rundir import _check_writable

    errors = []
    for attempt in range(60):
        path = tmp_path / f"runs-{attempt}" / "ddp"
        barrier = threading.Barrier(4)

        def probe():
            barrier.wait()
            try:
                _check_writable(path)
            except Exception as e:  # noqa: BLE001 - collected and shown below
                errors.append(e)

        threads = [threading.Thread(target=probe) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert not any((tmp_path / f"runs-{attempt}").exists() for attempt in range(60))  # no trace left
