"""Outputs that are complete or absent: atomic file writes and atomic directory replacement.

Every command that writes a result (run.json, adapters, merged models, reports, plots) goes through
here, so a crash or Ctrl-C never leaves half a file or a directory that looks finished but is not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_json", "atomic_write_text", "fsync_tree", "partial_dir", "publish_dir"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; our outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk before a rename makes it visible (a power cut must not
    leave a finished-looking directory of zero-length files)."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def partial_dir(out: Path) -> Path:
    """Where ``out`` is built before :func:`publish_dir`: beside it (same file system, so the rename is
    atomic), hidden, and named so that no loader mistakes a leftover for a finished directory."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


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
