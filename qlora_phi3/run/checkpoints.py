"""Checkpoints that are complete or absent: written to a staging directory, renamed when done.

transformers' Trainer writes ``checkpoint-N`` in place, file by file, so a run killed mid-save leaves a
directory that looks like a checkpoint but cannot be resumed. We let the Trainer write into
``<output_dir>/.staging/`` and rename the finished directory into place (an atomic rename on one file
system), so the newest ``checkpoint-N`` is always whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["AtomicCheckpoints", "STAGING_DIR", "is_complete", "last_checkpoint"]

STAGING_DIR = ".staging"
# What a resumable checkpoint must hold (optimizer/scheduler/RNG are written after the adapter).
_REQUIRED = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt",
             "scheduler.pt")


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED)


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``; partial ones (from older tools) are skipped."""
    done = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and is_complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


class AtomicCheckpoints:
    """Trainer mixin: stage each checkpoint, rename it into place, then prune to ``save_total_limit``."""

    _staging_root: str | None = None

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that was killed
            staging.mkdir(parents=True, exist_ok=True)
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        if not self.args.should_save:
            return
        final = run_dir / name
        if final.exists():  # a checkpoint of the same step from a run that was resumed before this save
            shutil.rmtree(final)
        _fsync_tree(staging / name)
        os.replace(staging / name, final)
        shutil.rmtree(staging, ignore_errors=True)
        from transformers.trainer_utils import rotate_checkpoints

        # By step number, not mtime: a resumed run must never prune its newest checkpoint.
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)


def _fsync_tree(path: Path) -> None:
    """Flush the files to disk before the rename makes them visible (a power cut must not leave zeros)."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
