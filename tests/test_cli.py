"""The command line: instant help that lists every option, clean one-line errors."""

import subprocess
import sys

import pytest

from qlora_phi3.config import field_help


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "qlora_phi3", *args], capture_output=True, text=True, timeout=timeout)


def test_help_imports_nothing_heavy():
    code = ("import sys, qlora_phi3.cli as c; c.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'datasets') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_help_lists_every_option_and_recipe_key():
    res = _run("train", "--help")
    assert res.returncode == 0
    for flag in ("--resume", "--force", "RECIPE", "KEY=VALUE"):
        assert flag in res.stdout
    for key, _, _ in field_help():
        assert key in res.stdout, key


@pytest.mark.parametrize("command", ["data", "estimate", "fit", "profile"])
def test_every_recipe_command_lists_the_recipe_keys(command):
    res = _run(command, "--help")
    assert res.returncode == 0
    for key, _, _ in field_help():
        assert key in res.stdout, (command, key)


def test_top_level_help_lists_train():
    res = _run("--help")
    assert res.returncode == 0 and "train" in res.stdout


def test_bad_override_is_one_clean_line(tmp_path):
    res = _run("train", "lora.rank=4", f"train.output_dir={tmp_path / 'x'}")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "unknown key 'lora.rank'" in res.stderr and "did you mean 'lora.r'" in res.stderr


def test_missing_data_file_fails_before_model_load(tmp_path):
    res = _run("train", "data.path=/nonexistent/chats.jsonl", f"train.output_dir={tmp_path / 'x'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "file not found" in res.stderr
