"""The recipe schema: precedence, unknown keys, types, impossible values, shipped recipes."""

from pathlib import Path

import pytest
import yaml

from qlora_phi3.config import RECIPES_DIR, dump_recipe, load_recipe, recipe_to_dict
from qlora_phi3.errors import UserError

REQUIRED_KEYS = [
    "model.name_or_path", "model.revision", "model.attn_implementation", "lora.r", "lora.alpha", "lora.dropout",
    "lora.target_modules", "data.path", "data.max_seq_len", "train.output_dir", "train.max_steps", "train.epochs",
    "train.micro_batch_size", "train.grad_accum", "train.lr", "train.optimizer", "train.gradient_checkpointing",
    "train.seed",
]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_required_keys_exist_and_override():
    d = recipe_to_dict(load_recipe())
    for key in REQUIRED_KEYS:
        section, name = key.split(".")
        assert name in d[section], key


def test_precedence_defaults_file_overrides(tmp_path):
    p = _write(tmp_path, "lora:\n  r: 8\n  alpha: 16\ntrain:\n  lr: 1.0e-4\n")
    r = load_recipe(p, ["lora.r=32", "train.max_steps=10", "train.gradient_checkpointing=false",
                        "lora.target_modules=qkv_proj,o_proj"])
    assert r.lora.r == 32  # override beats file
    assert r.lora.alpha == 16  # file beats default
    assert r.train.lr == 1e-4
    assert r.train.max_steps == 10
    assert r.train.gradient_checkpointing is False
    assert r.lora.target_modules == ["qkv_proj", "o_proj"]
    assert r.train.optimizer == "paged_adamw_8bit"  # default


def test_float_written_like_yaml_1_1_string(tmp_path):
    # PyYAML reads 2e-4 (no dot) as a string; the schema still wants a number there.
    assert load_recipe(_write(tmp_path, "train:\n  lr: 2e-4\n")).train.lr == pytest.approx(2e-4)


def test_unknown_key_names_key_line_and_suggestion(tmp_path):
    p = _write(tmp_path, "lora:\n  r: 8\n  rnak: 4\n")
    with pytest.raises(UserError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:3" in msg and "lora.rnak" in msg and "did you mean 'lora.r" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match=r"r.yaml:1: unknown section 'trian'.*did you mean 'train'"):
        load_recipe(_write(tmp_path, "trian:\n  lr: 1\n"))


def test_unknown_override_key():
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rate'.*did you mean 'train.lr'"):
        load_recipe(None, ["train.learning_rate=1e-4"])


@pytest.mark.parametrize("text,key", [
    ("lora:\n  r: sixteen\n", "lora.r"),
    ("train:\n  gradient_checkpointing: maybe\n", "train.gradient_checkpointing"),
    ("train:\n  optimizer: sgd\n", "train.optimizer"),
    ("lora:\n  target_modules: 5\n", "lora.target_modules"),
])
def test_wrong_type_names_key(tmp_path, text, key):
    with pytest.raises(UserError, match=key) as e:
        load_recipe(_write(tmp_path, text))
    assert "r.yaml:2" in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("lora.r=0", "lora.r"), ("train.lr=-1", "train.lr"), ("data.max_seq_len=0", "data.max_seq_len"),
    ("train.micro_batch_size=0", "train.micro_batch_size"), ("lora.dropout=1.5", "lora.dropout"),
])
def test_impossible_values(override, key):
    with pytest.raises(UserError, match=rf"command line '{override}': '{key}'"):
        load_recipe(None, [override])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"r.yaml:\d+: invalid YAML"):
        load_recipe(_write(tmp_path, "lora:\n  r: [1,\n"))
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(None, ["lora.r=8", "model.revision=abc123", "train.lr=3e-5"])
    dump_recipe(r, tmp_path / "recipe.yaml")
    assert recipe_to_dict(load_recipe(tmp_path / "recipe.yaml")) == recipe_to_dict(r)


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_documents_itself(path):
    recipe = load_recipe(path)
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert text.startswith("#") and ("qlora-phi3 " in header or "-m qlora_phi3 train" in header), \
        "a recipe opens with the command that runs it"
    assert yaml.safe_load(text)  # plain YAML
    assert recipe.lora.target_modules


def test_headline_recipe_is_pinned_and_commented():
    path = RECIPES_DIR / "phi3_mini_4k_12gb.yaml"
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert recipe.model.revision and len(recipe.model.revision) == 40
    lines = path.read_text().splitlines()
    for knob in ("max_seq_len", "micro_batch_size", "grad_accum", "optimizer", "gradient_checkpointing", "r:"):
        line = next(ln for ln in lines if ln.strip().startswith(knob))
        assert "#" in line, f"memory knob {knob} needs a comment"
