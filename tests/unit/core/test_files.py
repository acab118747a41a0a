"""Outputs that are complete or absent (files.py)."""

import json

import pytest

from qlora_phi3.files import atomic_write_json, partial_dir, publish_dir


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
