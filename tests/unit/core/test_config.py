"""The recipe schema: precedence, unknown keys, types, impossible values, shipped recipes."""

import typing
from pathlib import Path

import pytest
import yaml

from qlora_phi3.config import SECTIONS, dump_recipe, field_help, load_recipe, recipe_to_dict, recipes_dir
from qlora_phi3.errors import UserError

def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def _another_value(key: str, default):
    """A valid value other than the default for any recipe key (so every field is exercised)."""
    special = {"train.max_steps": "7", "data.max_seq_len": "96", "data.eval_fraction": "0.2", "lora.dropout": "0.2",
               "train.warmup_ratio": "0.1", "data.max_bad_fraction": "0.3", "train.epochs": "2.5",
               "lora.target_modules": "qkv_proj,o_proj", "train.gradient_checkpointing": "offload",
               "train.neftune_noise_alpha": "5", "train.report_to": "tensorboard,mlflow", "train.tile_tokens": "64",
               "train.beta": "0.3", "train.top_p": "0.9", "train.reward_weights": "2.0",
               "train.rewards": "numeric_answer"}
    if key in special:
        return special[key]
    hints = typing.get_type_hints(SECTIONS[key.split(".")[0]])
    tp = hints[key.split(".")[1]]
    if typing.get_origin(tp) is typing.Literal:
        return next(str(c) for c in typing.get_args(tp) if c != default)
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, int):
        return str(default + 3)
    if isinstance(default, float):
        return str(default * 2 or 0.5)
    if default is None and int in typing.get_args(tp):
        return "5"
    return "some-value"  # strings and unset optional strings


def test_every_key_can_be_overridden_and_survives_the_saved_recipe(tmp_path):
    overrides = [f"{key}={_another_value(key, default)}" for key, _, default in field_help()]
    recipe = load_recipe(None, overrides)
    flat = {f"{s}.{k}": v for s, body in recipe_to_dict(recipe).items() for k, v in body.items()}
    defaults = {key: default for key, _, default in field_help()}
    assert all(flat[key] != defaults[key] for key in flat), [k for k in flat if flat[k] == defaults[k]]
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    assert recipe_to_dict(load_recipe(tmp_path / "recipe.yaml")) == recipe_to_dict(recipe)


def test_all_problems_are_reported_at_once_each_with_its_line(tmp_path):
    p = _write(tmp_path, "lora:\n  rank: 8\n  dropuot: 0.1\ntrain:\n  learning_rate: 1e-4\n  micro_batch_size: two\n")
    with pytest.raises(UserError) as e:
        load_recipe(p, ["data.maxseq=4"])
    lines = str(e.value).splitlines()
    assert lines == [f"{p}:2: unknown key 'lora.rank' (did you mean 'lora.r'?).",
                     f"{p}:3: unknown key 'lora.dropuot' (did you mean 'lora.dropout'?).",
                     f"{p}:5: unknown key 'train.learning_rate' (did you mean 'train.lr'?).",
                     f"{p}:6: 'train.micro_batch_size' must be an integer, got 'two'.",
                     "command line 'data.maxseq=4': unknown key 'data.maxseq' (did you mean 'data.max_seq_len'?)."]


@pytest.mark.parametrize("text,tool,translated", [
    ("base_model: microsoft/Phi-3-mini-4k-instruct\nadapter: qlora\nload_in_4bit: true\nlora_r: 16\n"
     "sequence_len: 2048\nsample_packing: true\n", "an Axolotl config",
     ["base_model -> model.name_or_path", "lora_r -> lora.r", "sequence_len -> data.max_seq_len",
      "sample_packing -> data.packing", "adapter: no equivalent"]),
    ("model_name_or_path: microsoft/Phi-3-mini-4k-instruct\nstage: sft\nfinetuning_type: lora\nlora_rank: 8\n"
     "cutoff_len: 1024\ntemplate: phi\n", "a LLaMA-Factory config",
     ["model_name_or_path -> model.name_or_path", "lora_rank -> lora.r", "cutoff_len -> data.max_seq_len"]),
    ("output_dir: out\nper_device_train_batch_size: 2\nnum_train_epochs: 1\nlearning_rate: 0.0002\n"
     "lr_scheduler_type: cosine\n", "a Hugging Face TrainingArguments config",
     ["per_device_train_batch_size -> train.micro_batch_size", "learning_rate -> train.lr",
      "lr_scheduler_type -> train.lr_scheduler"]),
])
def test_other_tools_configs_are_recognised_and_translated(tmp_path, text, tool, translated):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"looks like {tool}" in msg and "sections model, lora, data, train" in msg
    for line in translated:
        assert line in msg, line
    assert f"{p}:1 " in msg  # every key with its line


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


@pytest.mark.parametrize("path", sorted(recipes_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_documents_itself(path):
    recipe = load_recipe(path)
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert text.startswith("#") and ("qlora-phi3 " in header or "-m qlora_phi3 train" in header), \
        "a recipe opens with the command that runs it"
    assert yaml.safe_load(text)  # plain YAML
    assert recipe.lora.target_modules


def test_headline_recipe_is_pinned_and_commented():
    path = recipes_dir() / "phi3_mini_4k_12gb.yaml"
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert recipe.model.revision and len(recipe.model.revision) == 40
    lines = path.read_text().splitlines()
    for knob in ("max_seq_len", "micro_batch_size", "grad_accum", "optimizer", "gradient_checkpointing", "r:"):
        line = next(ln for ln in lines if ln.strip().startswith(knob))
        assert "#" in line, f"memory knob {knob} needs a comment"


@pytest.mark.parametrize("name, body", [
    ("chats.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": []}\n'),  # YAML error, line 2
    ("one.jsonl", b'{"prompt": "What is 2+2?", "answer": "4"}\n'),  # one record: a YAML mapping, no section
    ("rows.json", b'[{"prompt": "a"}]'),  # a list
    ("rows.parquet", b"PAR1\x15\x04\x15\xff\xfe\x00"),  # binary
])
def test_a_data_file_given_as_the_recipe_says_where_it_belongs(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(UserError, match=rf"{name} looks like a data file, not a recipe: .*data\.path={path}"):
        load_recipe(path)
