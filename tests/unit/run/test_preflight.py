"""Fail fast (run/preflight.py): mistakes in files, directories, records, the context length, the LoRA variant, a
continued adapter and the trackers are refused before torch and transformers load, with the messages the training
path gives."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_phi3.config import load_recipe, resolve_recipe
from qlora_phi3.errors import UserError
from qlora_phi3.run.preflight import known_context, preflight

REPO = Path(__file__).resolve().parents[3]


def _completed_run(path: Path) -> Path:
    (path / "adapter").mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"status": "completed", "steps": 40}))
    return path


def _adapter(path: Path, r: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 32, "target_modules": [
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


# Stands in for a tracker that is not installed (wandb may be, where the tests run): find_spec says it is absent.
NO_WANDB = ("import importlib.util as _u; _find = _u.find_spec; "
            "_u.find_spec = lambda name, *a: None if name == 'wandb' else _find(name, *a)")


def _cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(overrides, the expected message's words): one mistake each."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    done = _completed_run(tmp_path / "done")
    unusable = tmp_path / "texts.jsonl"
    unusable.write_text('{"text": "hello"}\n{"text": "bye"}\n')
    other_rank = _adapter(tmp_path / "r8", 8)
    return [
        ([f"data.path={unusable}"], "no usable conversations"),
        ([f"data.path={tmp_path / 'missing.jsonl'}"], "file not found"),
        ([f"data.path={empty}"], "the data file is empty"),
        ([f"data.path={tmp_path}"], "is a directory; point it at a data file"),
        ([f"train.output_dir={done}"], "already holds a completed run (40 optimizer steps)"),
        (["data.max_seq_len=100000"], "exceeds the model's context of 4096"),
        # Checked before torch too: they need the data, the recipe or a file, not the model.
        (["train.method=dpo"], "holds chat records, not preference data; train.method=dpo needs pairs"),
        (["data.path=nobody/no-such-dataset"], "the Hugging Face Hub is unreachable and the dataset is not cached"),
        (["lora.init=pissa"], "lora.init=pissa: PEFT's PiSSA takes an SVD"),
        (["lora.init=olora", "lora.use_dora=true"], "lora.init=olora with lora.use_dora=true"),
        ([f"model.adapter={other_rank}"], "has another LoRA shape than the recipe; to continue it set: lora.r=8"),
        (["train.report_to=wandb"], "pip install 'qlora-phi3[wandb]'"),
    ]


def test_refusals_name_the_mistake(tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find(name, *a))
    for overrides, expect in _cases(tmp_path):
        recipe = load_recipe(resolve_recipe("tiny_cpu"), [f"train.output_dir={tmp_path / 'run'}", *overrides])
        with pytest.raises(UserError, match=re.escape(expect)):
            preflight(recipe)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_good_recipe_passes_and_writes_nothing(tmp_path):
    recipe = load_recipe(resolve_recipe("tiny_cpu"), [f"train.output_dir={tmp_path / 'run'}"])
    preflight(recipe)
    assert not (tmp_path / "run").exists()


def test_context_is_known_without_transformers_for_embedded_and_published_models():
    assert known_context(load_recipe(resolve_recipe("tiny_cpu"), []).model) == 4096
    assert known_context(load_recipe(resolve_recipe("phi3_mini_128k_12gb"), []).model) == 131072


@pytest.mark.slow  # a fresh interpreter: the only way to see what a command imports
def test_train_refuses_in_a_fresh_process_without_importing_torch(tmp_path):
    cases = _cases(tmp_path)
    code = (
        f"{NO_WANDB}\n"
        "import json, sys\n"
        "from qlora_phi3.cli import main\n"
        "out = []\n"
        f"for overrides in {[c[0] for c in cases]!r}:\n"
        f"    code = main(['train', 'train.output_dir={tmp_path / 'run'}', *overrides])\n"
        "    out.append([code, [m for m in ('torch', 'transformers') if m in sys.modules]])\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for (code, heavy), (_, expect) in zip(results, cases):
        assert code == 2 and heavy == [], (expect, code, heavy)
    errors = res.stderr.strip().splitlines()
    assert len(errors) == len(cases) and all(expect in line for line, (_, expect) in zip(errors, cases)), errors
