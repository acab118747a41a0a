"""Outputs that are complete or absent: atomic file writes and atomic directory replacement.

Every command that writes a result (run.json, adapters, merged models, reports, plots) goes through
here, so a crash or Ctrl-C never leaves half a file or a directory that looks finished but is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["FAILED_SUFFIX", "atomic_write_json", "atomic_write_text", "fsync_tree", "partial_dir", "publish_checked",
           "publish_dir", "shared_mode", "staging"]

# An output that failed its check, next to a good earlier one, goes to "<out>-failed", never over it.
FAILED_SUFFIX = "-failed"


def shared_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the user's umask (0644 under umask 022,
    0600 under 077). Read from /proc on Linux; elsewhere set and restore at once (Python has no call that reads the
    umask without setting it, and another thread creating a file in between would get the wrong mask)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o077)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, shared_mode())  # mkstemp makes it 0600; our outputs follow the umask like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk before a rename makes it visible (a power cut must not
    leave a finished-looking directory of zero-length files), each with the mode the umask gives a new file:
    safetensors (0.8) saves through a temporary file that stays 0600, so model weights would be the one file
    another user or a serving container cannot read."""
    mode = shared_mode()
    for p in Path(path).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def partial_dir(out: Path) -> Path:
    """Where ``out`` is built before :func:`publish_dir`: beside it (same file system, so the rename is
    atomic), hidden, and named so that no loader mistakes a leftover for a finished directory."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def staging(out: Path):
    """A fresh, empty :func:`partial_dir` for ``out`` to build in, removed if anything goes wrong before it is
    published (an error, a failed check's exception, Ctrl-C): never a half-written output left behind."""
    stage = partial_dir(out)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish_dir(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp``; an old ``out`` is removed only once the new one is in place."""
    tmp, out = Path(tmp), Path(out)
    fsync_tree(tmp)
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def publish_checked(stage: Path, out: Path, passed: bool,
                    finish: Callable[[Path], None] | None = None) -> tuple[Path, Path | None]:
    """Publish the finished ``stage`` as ``out`` once its check has run: the one way ``export``, ``export --adapter``
    and ``merge`` publish, so none replaces a good earlier output with one that failed.

    Passed: ``stage`` replaces ``out`` (:func:`publish_dir`). Failed: when ``out`` holds an earlier output, that is
    left exactly as it was and the failed one goes beside it as ``<out>-failed`` (replacing an earlier failed one),
    for the caller's error to point at; into an empty or new ``out`` it goes as asked. ``finish(dest)`` runs just
    before the rename with where the output will be (a report that names its own directory is written there).
    Returns (where it went, the earlier output kept in place or None)."""
    out = Path(out)
    dest, kept = out, None
    if not passed and out.is_dir() and any(out.iterdir()):
        dest, kept = out.with_name(out.name + FAILED_SUFFIX), out
    if finish is not None:
        finish(dest)
    publish_dir(stage, dest)
    return dest, kept
