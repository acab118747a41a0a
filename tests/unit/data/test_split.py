"""Which conversations are held out for eval (data/split.py): seeded, disjoint from training, and never the
training file loaded a second time."""

import json

import pytest

from qlora_phi3.config import DataConfig, load_recipe, recipes_dir
from qlora_phi3.data.read import ChatRecord
from qlora_phi3.data.split import hold_out, load_splits
from qlora_phi3.errors import UserError


def _conv(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus 1?"}, {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]


def _write(path, convs) -> str:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    return str(path)


def test_hold_out_is_seeded_and_disjoint():
    recs = [ChatRecord(_conv(i), f"f:{i}") for i in range(100)]
    tr1, ev1 = hold_out(recs, 0.1, 50, seed=1)
    tr2, ev2 = hold_out(recs, 0.1, 50, seed=1)
    assert [r.origin for r in ev1] == [r.origin for r in ev2] and len(ev1) == 10 and len(tr1) == 90
    assert not {r.origin for r in ev1} & {r.origin for r in tr1}
    _, ev3 = hold_out(recs, 0.1, 50, seed=2)
    assert [r.origin for r in ev3] != [r.origin for r in ev1]


def test_quickstart_on_a_local_file_holds_out_eval_instead_of_reloading_the_file(tmp_path):
    """The README Quickstart: a GPU recipe (eval_split: test_sft) with data.path=my_chats.jsonl."""
    path = _write(tmp_path / "my_chats.jsonl", [_conv(i) for i in range(60)])
    recipe = load_recipe(recipes_dir() / "phi3_mini_4k_12gb.yaml", [f"data.path={path}"])
    assert recipe.data.eval_split == "test_sft"
    splits = load_splits(recipe.data, recipe.train.seed)
    assert len(splits.eval) == 3 and len(splits.train) == 57  # 5% held out, not "60 train / 60 eval"
    digests = {json.dumps(r.messages) for r in splits.train}
    assert not any(json.dumps(r.messages) in digests for r in splits.eval)
    assert any("data.eval_split='test_sft' ignored" in n and "no named splits" in n for n in splits.notes)


def test_hub_splits_that_overlap_drop_the_shared_conversations_from_eval(monkeypatch):
    import datasets

    rows = {"train_sft": [_conv(i) for i in range(20)], "test_sft": [_conv(i) for i in range(15, 25)]}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, split=None, revision=None: datasets.Dataset.from_dict({"messages": rows[split]}))
    cfg = DataConfig(path="org/chats", split="train_sft", eval_split="test_sft")
    splits = load_splits(cfg, seed=0)
    assert len(splits.train) == 20 and len(splits.eval) == 5  # 15..19 are in both: dropped from eval
    assert splits.eval_overlap_dropped == 5 and any("5 eval conversations" in n for n in splits.notes)
    assert all(int(r.messages[0]["content"].split()[2]) >= 20 for r in splits.eval)


def test_an_eval_split_that_is_the_training_data_is_refused(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda path, split=None, revision=None:
                        datasets.Dataset.from_dict({"messages": [_conv(i) for i in range(10)]}))
    with pytest.raises(UserError, match="every eval conversation .* is also in the training data"):
        load_splits(DataConfig(path="org/chats", split="train", eval_split="test"), seed=0)


def test_saved_dataset_dict_uses_its_named_eval_split(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"messages": [_conv(i) for i in range(30)]}),
        "test": datasets.Dataset.from_dict({"messages": [_conv(i) for i in range(100, 104)]}),
    }).save_to_disk(tmp_path / "ds")
    splits = load_splits(DataConfig(path=str(tmp_path / "ds"), split="train", eval_split="test"), seed=0)
    assert len(splits.train) == 30 and len(splits.eval) == 4 and not splits.notes
