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

from qlora_phi3.files import fsync_tree

__all__ = ["AtomicCheckpoints", "STAGING_DIR", "is_complete", "last_checkpoint"]

STAGING_DIR = ".staging"
# What a resumable checkpoint must hold, each as one of its forms: the adapter (or, under FSDP with
# SHARDED_STATE_DICT, the model's shard directory written by accelerate's save_fsdp_model), the optimizer
# (optimizer.pt, or FSDP's optimizer_0/ directory), the scheduler and the trainer state (written last).
_REQUIRED = (("adapter_model.safetensors", "pytorch_model_fsdp_0/"), ("optimizer.pt", "optimizer_0/", "optimizer.bin"),
             ("scheduler.pt",), ("trainer_state.json",))


def _present(path: Path, name: str) -> bool:
    return (path / name.rstrip("/")).is_dir() if name.endswith("/") else (path / name).is_file()


def is_complete(path: Path) -> bool:
    return path.is_dir() and all(any(_present(path, name) for name in forms) for forms in _REQUIRED)


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``; partial ones (from older tools) are skipped."""
    done = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and is_complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


class AtomicCheckpoints:
    """Trainer mixin: stage each checkpoint, rename it into place, then prune to ``save_total_limit``.

    It overrides two private Trainer methods (no public hook exists); qlora_phi3.run.internals names them,
    with the transformers version they were checked against.
    """

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
        fsync_tree(staging / name)
        os.replace(staging / name, final)
        shutil.rmtree(staging, ignore_errors=True)
        # By step number, not mtime: a resumed run must never prune its newest checkpoint. Imported here: the run
        # directory checks (last_checkpoint) run before transformers loads (run/preflight.py).
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
