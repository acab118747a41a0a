"""The command line: instant help that lists every option, clean one-line errors."""

import subprocess
import sys

import pytest

from qlora_phi3.config import field_help
from qlora_phi3.errors import UserError


@pytest.mark.slow  # a fresh interpreter: only a new process shows what --help imports
def test_help_imports_nothing_heavy():
    code = ("import sys, qlora_phi3.cli as c; c.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes', 'datasets') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_help_lists_every_option_and_recipe_key(qlora):
    res = qlora("train", "--help")
    assert res.returncode == 0
    for flag in ("--resume", "--force", "RECIPE", "KEY=VALUE"):
        assert flag in res.stdout
    for key, _, _ in field_help():
        assert key in res.stdout, key


@pytest.mark.parametrize("command", ["data", "estimate", "fit", "profile"])
def test_every_recipe_command_lists_the_recipe_keys(command, qlora):
    res = qlora(command, "--help")
    assert res.returncode == 0
    for key, _, _ in field_help():
        assert key in res.stdout, (command, key)


def test_top_level_help_lists_train(qlora):
    res = qlora("--help")
    assert res.returncode == 0 and "train" in res.stdout


def test_bad_override_is_one_clean_line(tmp_path, qlora):
    res = qlora("train", "lora.rank=4", f"train.output_dir={tmp_path / 'x'}")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "unknown key 'lora.rank'" in res.stderr and "did you mean 'lora.r'" in res.stderr


def test_missing_data_file_fails_before_model_load(tmp_path, qlora, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data error")

    monkeypatch.setattr("qlora_phi3.run.train.load_model", no_model)
    res = qlora("train", "data.path=/nonexistent/chats.jsonl", f"train.output_dir={tmp_path / 'x'}")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "file not found" in res.stderr


@pytest.mark.parametrize("argv,expect_overrides", [
    (["train", "tiny_cpu", "--force", "lora.r=8", "train.max_steps=2"], ["lora.r=8", "train.max_steps=2"]),
    (["train", "lora.r=8", "--resume"], ["lora.r=8"]),
    (["data", "tiny_cpu", "--sample", "2", "data.max_samples=20"], ["data.max_samples=20"]),
    (["estimate", "phi3_mini_4k_12gb", "--budget", "12GiB", "lora.r=16"], ["lora.r=16"]),
    (["fit", "--budget", "8GiB", "phi3_mini_4k_12gb", "lora.r=8", "--out", "x.yaml"], ["lora.r=8"]),
    (["profile", "tiny_cpu", "lora.r=4", "--steps", "1", "--grid", "data.max_seq_len=32,64"], ["lora.r=4"]),
])
def test_flags_and_overrides_in_any_order(argv, expect_overrides):
    from qlora_phi3.cli import _build

    _, commands = _build()
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    assert [o for o in ([args.recipe] if args.recipe and "=" in args.recipe else []) + args.overrides] == \
        expect_overrides


def test_estimate_with_an_override_after_a_flag_runs(capsys):
    from qlora_phi3.cli import main

    assert main(["estimate", "phi3_mini_4k_12gb", "--budget", "12GiB", "lora.r=64"]) == 0
    out = capsys.readouterr().out
    assert "r=64" in out and "fits" in out


def test_recipes_are_listed_copied_and_usable_by_name(tmp_path, capsys, monkeypatch):
    from qlora_phi3.cli import main
    from qlora_phi3.config import load_recipe, resolve_recipe, shipped_recipes

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in shipped_recipes():
        assert name in out
    assert "12 GB" in out  # each recipe's own first header line says what it is for
    assert main(["recipes", "copy", "phi3_mini_4k_8gb", str(tmp_path)]) == 0
    copied = tmp_path / "phi3_mini_4k_8gb.yaml"
    assert copied.read_text() == shipped_recipes()["phi3_mini_4k_8gb"].read_text()
    assert main(["recipes", "copy", "phi3_mini_4k_8gb", str(tmp_path)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["recipes", "copy", "nope", str(tmp_path)]) == 2
    assert load_recipe(resolve_recipe("phi3_mini_4k_12gb")).train.micro_batch_size >= 1
    monkeypatch.chdir(tmp_path)  # not the checkout: the README's `recipes/...` paths still name shipped recipes
    assert resolve_recipe("recipes/tiny_cpu.yaml") == shipped_recipes()["tiny_cpu"]
    assert resolve_recipe("tiny_cpu") == resolve_recipe("tiny_cpu.yaml") == shipped_recipes()["tiny_cpu"]


def test_warnings_print_brackets_as_written(capsys):
    """Warnings are not rich markup: `[gguf]` in an install hint must reach the user (it was eaten)."""
    from qlora_phi3 import ui

    ui.status_to_stderr(False)
    ui.warn("not checked: pip install 'qlora-phi3[gguf]' [bold]")
    assert "pip install 'qlora-phi3[gguf]' [bold]" in capsys.readouterr().out


def test_help_texts_say_what_a_new_user_needs(capsys):
    """`chat --help` describes the command; `train --help` shows the values the default recipe really uses."""
    from qlora_phi3.cli import main

    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "stream and stop" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    from qlora_phi3.config import DEFAULT_RECIPE, load_recipe, resolve_recipe

    steps = load_recipe(resolve_recipe(DEFAULT_RECIPE), []).train.max_steps
    assert f"train.max_steps ({steps!r} in {DEFAULT_RECIPE}; schema default -1)" in capsys.readouterr().out


def test_misspelt_recipe_name_gets_a_did_you_mean():
    from qlora_phi3.config import resolve_recipe

    with pytest.raises(UserError, match="Did you mean phi3_mini_4k_12gb?"):
        resolve_recipe("phi3_mini_4k_12b")


def test_recipes_list_gives_whole_descriptions(capsys):
    from qlora_phi3.cli import main

    assert main(["recipes"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tiny_cpu"))
    assert line.rstrip().endswith(".")  # the header's whole first paragraph, not its first line
