"""Preference data: every format people have is read alike, every bad record is named with file:line and a fix,
data of the wrong kind for the method fails before any model loads, and the encoding cuts the SFT answer span."""

from __future__ import annotations

import gzip
import json

import pytest

from qlora_phi3.config import DataConfig
from qlora_phi3.data.encode import encode_conversation
from qlora_phi3.data.preference import (encode_pairs, encode_unpaired, load_preference_records,
                                        load_preference_splits)
from qlora_phi3.errors import UserError
from qlora_phi3.phi3 import IGNORE_INDEX

Q = "What is the capital of Zorvia?"
GOOD, BAD = "The capital of Zorvia is Quellan.", "The capital of Zorvia is Virest."
USER = {"role": "user", "content": Q}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(path, **kw):
    return DataConfig(path=str(path), max_bad_fraction=1.0, **kw)


def _pair(i=0):
    return {"prompt": [{"role": "user", "content": f"{Q} ({i})"}], "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": BAD}]}


def test_the_pair_formats_read_to_the_same_pair(tmp_path):
    conversational = _pair()
    implicit = {"chosen": conversational["prompt"] + conversational["chosen"],
                "rejected": conversational["prompt"] + conversational["rejected"]}
    strings = {"prompt": f"{Q} (0)", "chosen": GOOD, "rejected": BAD}
    ultrafeedback = {"prompt": f"{Q} (0)", "prompt_id": "ab12", **implicit, "score_chosen": 8.0, "score_rejected": 3.0}
    got = []
    for i, row in enumerate((conversational, implicit, strings, ultrafeedback)):
        records, report = load_preference_records(_cfg(_write(tmp_path / f"{i}.jsonl", [row])), "dpo")
        assert report.n_bad == 0
        got.append((records[0].prompt, records[0].chosen, records[0].rejected))
    assert got[0] == got[1] == got[2] == got[3] == ([{"role": "user", "content": f"{Q} (0)"}], GOOD, BAD)


def test_json_array_gzip_and_save_to_disk_sources(tmp_path):
    from datasets import Dataset

    rows = [_pair(i) for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    Dataset.from_list([{"prompt": f"{Q} {i}", "chosen": GOOD, "rejected": BAD, "score": 1.0} for i in range(3)]) \
        .save_to_disk(str(tmp_path / "saved"))
    for name in ("a.json", "b.jsonl.gz", "saved"):
        records, _ = load_preference_records(_cfg(tmp_path / name), "dpo")
        assert [r.chosen for r in records] == [GOOD] * 3, name
    lines = (tmp_path / "a.json").read_text().splitlines()
    for record in load_preference_records(_cfg(tmp_path / "a.json"), "dpo")[0]:  # each names the line it starts on
        line = int(record.origin.rsplit(":", 1)[1])
        assert lines[line - 1].strip() in ("{", "[{") and record.prompt[0]["content"] in "".join(lines[line:line + 9])


BAD_RECORDS = [
    ('{"prompt": "x", "chosen": "y", "rejected": ', "malformed JSON"),
    ({"prompt": Q, "chosen": GOOD}, "no 'rejected' field"),
    ({"chosen": [USER, {"role": "assistant", "content": GOOD}],
      "rejected": [{"role": "user", "content": "Another question?"}, {"role": "assistant", "content": BAD}]},
     "prompts differ"),
    ({"prompt": Q, "chosen": GOOD, "rejected": f"  {GOOD} "}, "chosen identical to rejected"),
    ({"prompt": Q, "chosen": GOOD, "rejected": "   "}, "empty answer"),
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": GOOD}, {"role": "user", "content": "And?"}],
      "rejected": [{"role": "assistant", "content": BAD}, {"role": "user", "content": "And?"}]},
     "last turn not the assistant's"),
    ({"prompt": Q, "chosen": "Say <|end|> now.", "rejected": BAD}, "special token in text"),
]


@pytest.mark.parametrize("row,reason", BAD_RECORDS, ids=[r for _, r in BAD_RECORDS])
def test_every_bad_pair_is_named_with_file_line(tmp_path, row, reason):
    path = _write(tmp_path / "p.jsonl", [_pair(1), row, _pair(2)])
    records, report = load_preference_records(_cfg(path), "dpo")
    assert len(records) == 2
    assert list(report.skipped) == [reason]
    ((origin, detail),) = report.skipped[reason]
    assert origin == f"{path}:2" and detail or reason == "malformed JSON"
    with pytest.raises(UserError, match=rf"{path}:2: .*data.strict is true"):
        load_preference_records(DataConfig(path=str(path), strict=True), "dpo")


def test_too_many_bad_pairs_fail_with_the_reasons_and_the_fix(tmp_path):
    path = _write(tmp_path / "p.jsonl", [_pair(1), {"prompt": Q, "chosen": GOOD}, {"prompt": Q, "chosen": GOOD}])
    with pytest.raises(UserError, match=r"2 of 3 records are bad.*no 'rejected' field.*p.jsonl:2.*max_bad_fraction"):
        load_preference_records(DataConfig(path=str(path)), "dpo")


def test_kto_label_must_be_boolean(tmp_path):
    good = {"prompt": Q, "completion": GOOD, "label": True}
    path = _write(tmp_path / "k.jsonl", [good, {**good, "completion": BAD, "label": "false"},
                                         {**good, "completion": BAD, "label": False}])
    records, report = load_preference_records(_cfg(path), "kto")
    assert [r.label for r in records] == [True, False]
    ((origin, detail),) = report.skipped["label not a boolean"]
    assert origin == f"{path}:2" and "true" in detail and "false" in detail


@pytest.mark.parametrize("method,rows,match", [
    ("kto", [_pair()], r"p.jsonl:1: .*holds preference pairs.*train.method=kto.*train.method=dpo"),
    ("dpo", [{"prompt": Q, "completion": GOOD, "label": True}], r"p.jsonl:1: .*unpaired.*train.method=kto"),
    ("orpo", [{"messages": [USER, {"role": "assistant", "content": GOOD}]}], r"chat records.*train.method=sft"),
    ("kto", [{"prompt": Q, "completion": GOOD, "label": True}, {"prompt": Q + "!", "completion": BAD, "label": True}],
     r"every KTO record has label true"),
])
def test_data_of_the_wrong_kind_for_the_method_fails_at_once(tmp_path, method, rows, match):
    with pytest.raises(UserError, match=match):
        load_preference_records(_cfg(_write(tmp_path / "p.jsonl", rows)), method)


def test_encoding_cuts_exactly_the_sft_answer_span(tiny_tokenizer, tmp_path):
    records, _ = load_preference_records(_cfg(_write(tmp_path / "p.jsonl", [_pair()])), "dpo")
    enc = encode_pairs(records, tiny_tokenizer, max_seq_len=512)
    for answer, ids in ((GOOD, enc.chosen_ids[0]), (BAD, enc.rejected_ids[0])):
        full, labels = encode_conversation(tiny_tokenizer, records[0].prompt + [{"role": "assistant", "content": answer}])
        assert enc.prompt_ids[0] + ids == full[:len(enc.prompt_ids[0]) + len(ids)]
        assert ids == [t for t in labels if t != IGNORE_INDEX]  # the tokens SFT puts loss on, <|end|> included
    assert tiny_tokenizer.decode(enc.prompt_ids[0]).endswith("<|assistant|>")


def test_truncation_and_prompt_limit_are_counted(tiny_tokenizer, tmp_path):
    long_prompt = {"prompt": "word " * 200, "chosen": GOOD, "rejected": BAD}
    records, _ = load_preference_records(_cfg(_write(tmp_path / "p.jsonl", [_pair(), long_prompt])), "dpo")
    enc = encode_pairs(records, tiny_tokenizer, max_seq_len=64)
    assert (enc.n_rows, enc.dropped) == (1, 1)  # the 200-word prompt fills 64 tokens by itself
    enc = encode_pairs(records, tiny_tokenizer, max_seq_len=64, max_prompt_len=32)
    assert enc.n_rows == 2 and enc.prompt_cut == 1 and len(enc.prompt_ids[1]) == 32
    assert tiny_tokenizer.decode(enc.prompt_ids[1]).endswith("<|assistant|>")  # the end of the prompt is kept
    enc = encode_pairs(records[:1], tiny_tokenizer, max_seq_len=len(enc.prompt_ids[0]) + 3)
    assert enc.truncated == 1 and len(enc.chosen_ids[0]) == 3 and enc.answer_tokens_lost > 0


def test_bundled_sets_split_without_shared_prompts(tiny_tokenizer):
    splits = load_preference_splits(DataConfig(path="embedded:tiny-prefs", eval_fraction=0.1), "dpo", seed=42)
    assert len(splits.eval) == 60 and len(splits.train) == 540
    train_prompts = {json.dumps(r.prompt) for r in splits.train}
    assert not any(json.dumps(r.prompt) in train_prompts for r in splits.eval)
    assert all(r.chosen != r.rejected for r in splits.train)
    kto = load_preference_splits(DataConfig(path="embedded:tiny-kto"), "kto", seed=42)
    labels = [r.label for r in kto.train]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    enc = encode_unpaired(kto.train, tiny_tokenizer, 128)
    assert enc.n_rows == len(kto.train) and enc.dropped == 0


@pytest.mark.parametrize("overrides,match", [
    (["train.beta=0"], r"'train.beta' must be positive"),
    (["train.method=kto", "train.micro_batch_size=1"], r"train.method=kto needs train.micro_batch_size of at least 2"),
    (["data.max_prompt_len=2048", "data.max_seq_len=1024"], r"'data.max_prompt_len' must be at least 1 and below"),
    (["train.method=ppo"], r"'train.method' must be one of 'sft', 'dpo', 'orpo', 'kto', 'simpo'"),
    (["train.dpo_loss=nope"], r"'train.dpo_loss' must be one of"),
])
def test_preference_keys_are_checked_with_the_fix(overrides, match):
    from qlora_phi3.config import load_recipe

    with pytest.raises(UserError, match=match):
        load_recipe(None, overrides)


def test_cli_data_shows_pair_lengths_cuts_and_the_mask_of_both_answers(tmp_path, capsys):
    from qlora_phi3.cli import main

    long = {"prompt": "word " * 60, "chosen": GOOD, "rejected": BAD}
    path = _write(tmp_path / "p.jsonl", [_pair(i) for i in range(6)] + [long])
    assert main(["data", "tiny_cpu_dpo", f"data.path={path}", "data.max_seq_len=48", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "7 records read as preference pairs" in text and "for train.method=dpo" in text
    assert "1 pairs dropped (the prompt fills a row)" in text
    assert "⟦The capital of Zorvia is Quellan.<|end|>⟧" in text and "⟦The capital of Zorvia is Virest.<|end|>⟧" in text
    report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert report["dropped"] == 1 and report["token_lengths"]["prompt"]["p100"] > 48
