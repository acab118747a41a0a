"""run.json's history and wall time, whole across any number of resumes, and kept current while the run trains.

A resumed run's Trainer starts from its checkpoint's state, whose log (``trainer_state.json``'s ``log_history``)
holds every row logged up to that step, also when the earlier process was killed before it could write run.json.
The history a resumed run records is that log, each row with our own numbers (tokens/s, peak memory) taken back
from the earlier run.json where it has them, then the new rows; rows the earlier run logged after its checkpoint are
dropped, as their steps are trained again. The wall time adds each session's to the earlier run.json's, which is
rewritten at every logged row, so a killed session counts up to its last row.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from qlora_phi3.ranks import is_main_process
from qlora_phi3.run.loss_plot import LOSS_PLOT, write_loss_plot

__all__ = ["KeepRecord", "earlier_history"]

OWN_KEYS = ("tokens_per_second", "peak_memory_gib")  # what run/progress.py adds to each Trainer log row


def _key(row: dict) -> tuple:
    return row.get("step"), tuple(sorted(k for k in row if k not in OWN_KEYS))


def earlier_history(checkpoint: Path, previous: list[dict]) -> list[dict]:
    """The rows logged up to ``checkpoint``, from its trainer state, with ``previous`` (the earlier run.json's
    history) supplying our own numbers; ``previous`` alone, cut at the checkpoint's step, if that state cannot be
    read."""
    step = int(Path(checkpoint).name.split("-")[-1])
    ours = [row for row in previous if row.get("step", 0) <= step]
    try:
        logged = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    except (OSError, ValueError, KeyError):
        return ours
    own = {_key(row): row for row in ours}
    rows = []
    for entry in logged:
        row = {"step": entry.get("step", 0), **{k: v for k, v in entry.items() if k != "step"}}
        match = own.get(_key(row), {})
        rows.append({**row, **{k: match[k] for k in OWN_KEYS if k in match}})
    return rows


class KeepRecord(TrainerCallback):
    """At each logged row, run.json's history and wall time so far; at each evaluation, ``loss.png`` redrawn."""

    def __init__(self, record, progress, t_start: float, title: str):
        self.record, self.progress, self.t_start, self.title = record, progress, t_start, title

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.record.update(history=self.progress.history, wall_seconds=self.record.wall_seconds(self.t_start))
        if logs and "eval_loss" in logs:
            self.plot()

    def plot(self) -> Path | None:
        """``loss.png`` redrawn; None when not drawn. The curve is a convenience: a failure to write it (a full disk,
        an unwritable file) is one warning, never a failed run, during training or after the adapter is saved."""
        if not is_main_process():
            return None
        path = self.record.path.with_name(LOSS_PLOT)
        try:
            return write_loss_plot(self.progress.history, path, self.title)
        except OSError as e:
            from qlora_phi3.ui import warn

            warn(f"{path}: the loss curve could not be written ({e.strerror or e}); the run goes on, and run.json "
                 "holds the same losses (its history).")
            return None
