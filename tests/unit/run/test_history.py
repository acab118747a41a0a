"""The record across resumes (run/history.py) and the loss curve (run/loss_plot.py)."""

import json

import pytest

from qlora_phi3.run.history import earlier_history
from qlora_phi3.run.loss_plot import write_loss_plot


def _checkpoint(tmp_path, step: int, log_history: list[dict]):
    ckpt = tmp_path / f"checkpoint-{step}"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log_history}))
    return ckpt


def test_history_up_to_the_checkpoint_comes_back_with_our_own_numbers(tmp_path):
    # The Trainer's log up to step 4 (as the checkpoint keeps it) ...
    logged = [{"eval_loss": 9.0, "epoch": 0, "step": 0}] + [
        {"loss": 5.0 - s, "learning_rate": 1e-3, "epoch": s / 8, "step": s} for s in range(1, 5)]
    # ... and the earlier run.json: our rows for steps 0-3 (tokens/s, memory), and step 5, past the checkpoint.
    ours = [{"step": r["step"], **{k: v for k, v in r.items() if k != "step"}, "tokens_per_second": 100.0 + r["step"],
             "peak_memory_gib": 0.5} for r in logged[:4]]
    ours.append({"step": 5, "loss": 0.1, "learning_rate": 1e-3, "epoch": 5 / 8, "tokens_per_second": 1.0,
                 "peak_memory_gib": 0.5})
    rows = earlier_history(_checkpoint(tmp_path, 4, logged), ours)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # step 5 is trained again after the resume
    assert rows[0]["eval_loss"] == 9.0 and rows[4]["loss"] == 1.0
    assert [r.get("tokens_per_second") for r in rows] == [100.0, 101.0, 102.0, 103.0, None]  # step 4: killed first


def test_a_checkpoint_without_its_state_falls_back_to_run_json(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    previous = [{"step": s, "loss": 1.0} for s in (1, 2, 3)]
    assert earlier_history(ckpt, previous) == previous[:2]


def test_loss_plot_is_a_png_of_both_curves_written_whole(tmp_path):
    from matplotlib import image

    history = [{"step": 0, "eval_loss": 10.0}] + [{"step": s, "loss": 10.0 / s} for s in range(1, 31)] + [
        {"step": 30, "eval_loss": 0.5}]
    path = write_loss_plot(history, tmp_path / "loss.png", "run: tiny")
    assert path == tmp_path / "loss.png"
    pixels = image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary left beside it
    assert write_loss_plot([{"step": 0, "learning_rate": 1e-3}], tmp_path / "none.png", "t") is None
    assert not (tmp_path / "none.png").exists()


def test_a_loss_curve_that_cannot_be_written_is_one_warning_not_a_failed_run(tmp_path, capsys):
    from types import SimpleNamespace

    from qlora_phi3.run.history import KeepRecord

    (tmp_path / "loss.png").mkdir()  # the file cannot replace a directory: the write fails as on a full disk
    record = SimpleNamespace(path=tmp_path / "run.json")
    progress = SimpleNamespace(history=[{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}])
    keeper = KeepRecord(record, progress, 0.0, "run: tiny")
    assert keeper.plot() is None
    out = capsys.readouterr().out
    assert "warning:" in out and "loss curve could not be written" in out and len(out.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no partial file left beside it
    (tmp_path / "loss.png").rmdir()
    assert keeper.plot() == tmp_path / "loss.png"  # and it is drawn again once it can be


@pytest.mark.parametrize(("method", "start", "end", "share"), [
    ("sft", 2.0, 0.5, "(25.0% of step 0)"), ("grpo", 1e-5, 0.0156, None), ("dpo", 0.6931, -0.2, None)])
def test_the_done_line_gives_a_share_of_step_0_only_for_a_chat_loss(capsys, tmp_path, method, start, end, share):
    """A cross-entropy's share of its step-0 value says how much was learned; a GRPO or preference loss starts near 0
    or goes negative, where the share read 156380.6%."""
    from qlora_phi3.memory.meter import MemoryStats
    from qlora_phi3.run.train import _say_done

    run = {"method": method, "eval_loss_start": start, "eval_loss_end": end, "wall_seconds": 1.0,
           "tokens_per_second": 1.0}
    _say_done(run, MemoryStats("cpu", 0.1, 0.1), tmp_path / "adapter", tmp_path / "run.json")
    printed = " ".join(capsys.readouterr().out.split())
    assert "eval loss" in printed and ("of step 0" in printed) == (share is not None)
    assert share is None or share in printed
