"""Outputs that are complete or absent (files.py)."""

import json
import os
import stat

import pytest

from qlora_phi3.files import atomic_write_json, atomic_write_text, partial_dir, publish_checked, publish_dir, staging


def test_atomic_write_never_leaves_half_a_file(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_json(path, {"status": "running"})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):  # fails while writing
        atomic_write_json(path, loop)
    assert json.loads(path.read_text()) == {"status": "running"}  # the old content, whole
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


def test_publish_replaces_a_directory_only_once_the_new_one_is_whole(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = partial_dir(out)
    assert tmp.name.startswith(".") and tmp.parent == out.parent  # hidden, same file system
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    publish_dir(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the old copy is gone too


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    """An atomic write gets the mode a plain open() gives a new file: 0644 under umask 022, 0600 under 077 (not
    mkstemp's 0600 always, nor a fixed 0644 that would share a file the user keeps private)."""
    atomic_write_text(tmp_path / "report.json", "{}")
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE((tmp_path / "report.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask


def _tree(path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_a_failed_output_never_replaces_a_good_one(tmp_path):
    out = tmp_path / "export"
    with staging(out) as stage:
        (stage / "model.gguf").write_bytes(b"good")
        assert publish_checked(stage, out, passed=True) == (out, None)
    with staging(out) as stage:
        (stage / "model.gguf").write_bytes(b"bad")
        where = {}
        dest, kept = publish_checked(stage, out, passed=False, finish=lambda d: where.setdefault("dest", d))
    assert (dest, kept, where["dest"]) == (tmp_path / "export-failed", out, dest)  # finish learns where it goes
    assert _tree(out) == {"model.gguf": b"good"} and _tree(dest) == {"model.gguf": b"bad"}
    # Failed into an empty or new directory: it goes where asked, nothing to keep.
    with staging(tmp_path / "fresh") as stage:
        (stage / "model.gguf").write_bytes(b"bad")
        assert publish_checked(stage, tmp_path / "fresh", passed=False) == (tmp_path / "fresh", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export-failed", "fresh"]


def test_staging_is_removed_when_the_build_fails(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        with staging(out) as stage:
            (stage / "half.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_published_weights_honour_the_umask(tmp_path, umask):
    """safetensors saves through a 0600 temporary file; what is published has the umask's mode like every other
    file (the merged model.safetensors was the one file another user could not read)."""
    import numpy as np
    from safetensors.numpy import save_file

    out = tmp_path / "merged"
    with staging(out) as stage:
        save_file({"w": np.zeros(2, np.float32)}, str(stage / "model.safetensors"))
        (stage / "config.json").write_text("{}")
        publish_checked(stage, out, passed=True)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}
