"""The run directory: may a new run use it, and what does ``--resume`` continue.

Rules, checked before any model is loaded:

* A new run takes an empty or new directory, or one whose earlier run left nothing of value (no
  complete checkpoint, no adapter: it failed or was stopped before its first save). A directory with
  a checkpoint or an adapter needs ``--resume`` (continue it) or ``--force`` (delete it, once the new
  run really starts). A directory that is not a qlora-phi3 run is never touched.
* ``--resume`` continues the run as it was started: its own ``recipe.yaml`` is the recipe. Settings
  that would make it another run (model, data, LoRA, batch, schedule, ...) are refused with the list of
  differences; only :data:`MAY_CHANGE_ON_RESUME` may change (e.g. more steps, other logging).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qlora_phi3.config import Recipe, load_recipe, recipe_to_dict, with_absolute_paths
from qlora_phi3.errors import UserError
from qlora_phi3.run.checkpoints import last_checkpoint
from qlora_phi3.run.record import RECIPE_FILE, RUN_FILE, read_run
from qlora_phi3.ui import plural

__all__ = ["MAY_CHANGE_ON_RESUME", "RunDir", "clear_run_dir", "prepare_run_dir", "resume_command"]

RUN_MARKERS = (RUN_FILE, RECIPE_FILE, "adapter")
# Keys whose change cannot make a resumed run another run. max_steps and epochs only upwards (train longer).
MAY_CHANGE_ON_RESUME = ("train.max_steps", "train.epochs", "train.logging_steps", "train.eval_steps",
                        "train.save_steps", "train.save_total_limit", "train.report_to", "train.run_name",
                        "train.sample_prompts", "train.sample_max_new_tokens", "train.output_dir",
                        "train.eval_tasks", "train.eval_include_path", "train.eval_limit")
_ONLY_UP = ("train.max_steps", "train.epochs")


@dataclass
class RunDir:
    """What the run directory check decided."""
    path: Path
    recipe: Recipe  # the recipe to run: on resume, the saved one with the allowed changes
    resume_from: Path | None = None  # the checkpoint to continue from
    previous: dict = field(default_factory=dict)  # the earlier run's run.json
    changes: dict = field(default_factory=dict)  # key -> (saved, now), allowed changes on resume
    replace: bool = False  # delete the directory's contents when the run starts (--force, or nothing of value)


def _is_run_dir(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS) or any(path.glob("checkpoint-*"))


def _has_value(path: Path) -> bool:
    return last_checkpoint(path) is not None or (path / "adapter").is_dir()


def _flat(recipe: Recipe) -> dict:
    return {f"{s}.{k}": v for s, body in recipe_to_dict(with_absolute_paths(recipe)).items() for k, v in body.items()}


def resume_command(path: Path) -> str:
    return f"qlora-phi3 train --resume {path}"


def _resume(path: Path, requested: Recipe) -> RunDir:
    saved_path = path / RECIPE_FILE
    previous = read_run(path)
    if not saved_path.is_file():
        raise UserError(f"--resume: {path} has no {RECIPE_FILE}, so the run cannot be continued as it was started; "
                        "start over with --force.")
    checkpoint = last_checkpoint(path)
    if checkpoint is None:
        status = previous.get("status", "unknown")
        step = previous.get("steps")
        raise UserError(f"--resume: nothing to resume in {path}: no complete checkpoint (the run ended "
                        f"'{status}'{f' at step {step}' if step is not None else ''} before its first save). "
                        f"Run it again without --resume: the directory is reused.")
    saved = load_recipe(saved_path, [])
    saved.train.output_dir = str(path)
    requested.train.output_dir = str(path)
    want, have = _flat(requested), _flat(saved)
    refused, changes = [], {}
    for key in have:
        if want[key] == have[key]:
            continue
        if key in MAY_CHANGE_ON_RESUME and not (key in _ONLY_UP and want[key] < have[key]):
            changes[key] = (have[key], want[key])
        else:
            refused.append(f"{key}: run has {have[key]!r}, asked {want[key]!r}")
    if refused:
        raise UserError(f"--resume: these settings differ from the run in {path} and would make it another run: "
                        + "; ".join(refused) + f". Continue it as it was with `{resume_command(path)}` (allowed "
                        f"changes: {', '.join(MAY_CHANGE_ON_RESUME[:-1])}; max_steps and epochs only upwards), or "
                        "start a new run with another train.output_dir.")
    if previous.get("status") == "completed" and not any(key in changes for key in _ONLY_UP):
        steps = previous.get("steps")
        raise UserError(f"--resume: the run in {path} is completed ({plural(steps or 0, 'optimizer step')}, adapter in "
                        f"{path / 'adapter'}); there is nothing left to resume. To train it longer, raise the "
                        f"step count: `{resume_command(path)} train.max_steps={max(2 * (steps or 1), 1)}`; to start "
                        "over, --force instead of --resume.")
    for key, (_, new) in changes.items():
        section, name = key.split(".")
        setattr(getattr(saved, section), name, new)
    return RunDir(path, saved, checkpoint, previous, changes)


def prepare_run_dir(recipe: Recipe, resume: bool, force: bool) -> RunDir:
    """Check ``recipe.train.output_dir`` for this run (see the module docstring); writes nothing but a
    writability probe, so a run that fails before it starts leaves the directory as it was."""
    if resume and force:
        raise UserError("--resume and --force contradict each other: resume continues the run in "
                        f"{recipe.train.output_dir}, force deletes it.")
    path = Path(recipe.train.output_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"train.output_dir={recipe.train.output_dir!r} is a file, not a directory.")
    occupied = path.is_dir() and any(path.iterdir())
    if occupied and not _is_run_dir(path):
        raise UserError(f"train.output_dir={recipe.train.output_dir!r} holds files that are not a qlora-phi3 run; "
                        "choose an empty or new directory.")
    if resume:
        if not occupied:
            raise UserError(f"--resume: nothing to resume in {path} (no run there yet); drop --resume.")
        plan = _resume(path, recipe)
    else:
        if occupied and _has_value(path) and not force:
            previous = read_run(path)
            if previous.get("status") == "completed":
                raise UserError(f"train.output_dir={recipe.train.output_dir!r} already holds a completed run "
                                f"({plural(previous.get('steps') or 0, 'optimizer step')}). Set "
                                "train.output_dir=NEW_DIR for a new run, add --force to delete it and start over, or "
                                f"train it longer with `{resume_command(path)} train.max_steps=N`.")
            raise UserError(f"train.output_dir={recipe.train.output_dir!r} already holds a run. Continue it with "
                            f"`{resume_command(path)}`, add --force to delete it and start over, or set "
                            "train.output_dir=NEW_DIR.")
        plan = RunDir(path, recipe, previous=read_run(path) if occupied else {}, replace=occupied)
    _check_writable(path)
    return plan


def _check_writable(path: Path) -> None:
    """Probe that ``path`` can be made and written, leaving no trace and making nothing: a file of a unique name is
    created and removed in ``path``, or, when it does not exist yet, in its nearest existing parent (the run makes
    the folders when it starts, so a run that fails before that leaves no empty run directory). Every rank of a
    torchrun launch probes the same path at once; unique names and no folders made and removed keep them apart."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"train.output_dir={str(path)!r} is not writable ({e.strerror}"
                        f"{'' if existing == path else f' in {existing}'}); choose a directory you can write to.") \
            from None


def clear_run_dir(path: Path) -> None:
    """Delete what an earlier run left in ``path`` (only ever called on a qlora-phi3 run directory)."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
