"""GRPO's prompt data: prompts as text or turns, every other column kept for the rewards, bad records reported with
file:line under the bad-record policy, prompts over the limit refused by their token count."""

import gzip
import json

import pytest

from qlora_phi3.config import DataConfig
from qlora_phi3.data.prompts import drop_long_prompts, load_prompt_records, load_prompt_splits, prompt_token_ids
from qlora_phi3.errors import UserError

GOOD = [{"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}], "answer": str(i + 1)} for i in range(8)]


def _write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_text_and_chat_prompts_keep_their_columns(tmp_path):
    path = _write(tmp_path, [{"prompt": "Say 2+2.", "answer": "4", "level": 1}, GOOD[0]], "p.jsonl.gz")
    records, report = load_prompt_records(DataConfig(path=str(path)))
    assert [r.prompt for r in records] == ["Say 2+2.", GOOD[0]["prompt"]]
    assert records[0].columns == {"answer": "4", "level": 1} and records[1].columns == {"answer": "1"}
    assert records[1].origin == f"{path}:2" and report.n_bad == 0


def test_bad_records_are_skipped_with_file_and_line(tmp_path):
    bad = [{"answer": "1"}, {"prompt": "  "}, {"prompt": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yo"}]}, "[1, 2]"]
    path = _write(tmp_path, GOOD * 1 + [GOOD[0]] + bad + GOOD[:0])
    cfg = DataConfig(path=str(path), max_bad_fraction=0.5)
    records, report = load_prompt_records(cfg)
    assert len(records) == 8
    lines = "\n".join(report.summary_lines())
    for reason, line in (("no 'prompt' field", 10), ("empty prompt", 11), ("repeated role", 12),
                         ("not a JSON object", 13)):
        assert f"1 x {reason}: {path}:{line}" in lines, lines
    assert f"{path}:9 (same as {path}:1)" in lines  # the duplicate, with its first copy
    with pytest.raises(UserError, match=f"{path}:10: no 'prompt' field"):
        load_prompt_records(DataConfig(path=str(path), strict=True))
    with pytest.raises(UserError, match="4 of 13 records are bad"):
        load_prompt_records(DataConfig(path=str(path)))


def test_chat_data_is_refused_with_the_prompt_format(tmp_path):
    path = _write(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    with pytest.raises(UserError, match="no usable prompts.*expects e.g. .*\"prompt\""):
        load_prompt_records(DataConfig(path=str(path)))


def test_prompts_over_the_limit_are_bad_records_counted_in_tokens(tmp_path, tiny_tokenizer):
    long = {"prompt": "word " * 80, "answer": "x"}
    path = _write(tmp_path, GOOD + [long])
    cfg = DataConfig(path=str(path), max_bad_fraction=0.2)
    records, report = load_prompt_records(cfg)
    lengths = [len(prompt_token_ids(tiny_tokenizer, r)) for r in records]
    kept, kept_lengths = drop_long_prompts(cfg, report, records, tiny_tokenizer, limit=40)
    assert len(kept) == 8 and kept_lengths == lengths[:8] and lengths[8] > 40
    assert f"1 x prompt over the limit: {path}:9 ({lengths[8]} tokens > 40" in report.summary_lines()[0]
    for cfg, message in ((DataConfig(path=str(path)), "1 of 9 records are bad .*prompt over the limit"),
                         (DataConfig(path=str(path), strict=True), f"{path}:9: prompt over the limit")):
        records, report = load_prompt_records(cfg)
        with pytest.raises(UserError, match=message):  # the policy, as for chats: a share of bad records, or strict
            drop_long_prompts(cfg, report, records, tiny_tokenizer, limit=40)


def test_the_split_holds_prompts_out_seeded_and_never_on_both_sides(tmp_path):
    path = _write(tmp_path, GOOD + [{"prompt": GOOD[0]["prompt"], "answer": "other"}])
    cfg = DataConfig(path=str(path), eval_fraction=0.25)
    a, b = load_prompt_splits(cfg, 1), load_prompt_splits(cfg, 1)
    assert [r.origin for r in a.eval] == [r.origin for r in b.eval] and a.eval
    train_prompts = {json.dumps(r.prompt) for r in a.train}
    assert not [r for r in a.eval if json.dumps(r.prompt) in train_prompts]


def test_data_inspection_shows_prompt_lengths_and_the_reward_columns(tmp_path, tiny_tokenizer):
    from qlora_phi3.config import load_recipe, recipes_dir
    from qlora_phi3.data.inspect_prompts import inspect_prompts

    path = _write(tmp_path, GOOD + [{"prompt": "word " * 80, "answer": "x", "level": 2}])
    recipe = load_recipe(recipes_dir() / "tiny_cpu_grpo.yaml", [f"data.path={path}", "data.max_bad_fraction=0.2",
                                                                 f"train.output_dir={tmp_path / 'run'}"])
    res = inspect_prompts(recipe, tiny_tokenizer, sample=0, out_dir=tmp_path / "report")
    assert res.prompt_limit == 64 - 16 and res.usable == 8 and res.skipped == 1
    assert res.reward_columns == ["answer"] and res.token_lengths["p100"] <= res.prompt_limit
    assert res.sample_text.endswith("<|assistant|>")  # generation starts right after the generation prompt
    assert json.loads((tmp_path / "report" / "data_report.json").read_text())["reward_columns"] == ["answer"]


def test_a_held_out_prompt_over_the_limit_is_counted_beside_the_held_out_share(tmp_path, tiny_tokenizer):
    from qlora_phi3.config import load_recipe, recipes_dir
    from qlora_phi3.data.inspect_prompts import inspect_prompts

    long = [{"prompt": f"word {i} " * 40, "answer": "x"} for i in range(6)]
    path = _write(tmp_path, GOOD + long)
    recipe = load_recipe(recipes_dir() / "tiny_cpu_grpo.yaml", [f"data.path={path}", "data.max_bad_fraction=0.5",
                                                                 "data.eval_fraction=0.5"])
    res = inspect_prompts(recipe, tiny_tokenizer, sample=0, out_dir=tmp_path / "report")
    held = int(res.eval_from.split(" held out")[0])
    dropped = held - res.eval
    assert dropped > 0 and res.eval_from.endswith(f"; {dropped} of them over the prompt limit")
