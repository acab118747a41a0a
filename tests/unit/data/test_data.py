"""Reading chat data: every format, every validation case, the skip/fail policy, file:line everywhere."""

import gzip
import json
from pathlib import Path

import pytest

from qlora_phi3.config import DataConfig
from qlora_phi3.data.read import load_records, turn_problem
from qlora_phi3.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "data"
GOOD = {"messages": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."}]}
EXPECTED_PAIR = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]


def _load(path, **kw):
    return load_records(DataConfig(path=str(path), **kw))


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _good_rows(n):
    return [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}."}]} for i in range(n)]


# ---- formats ----

def test_messages_format_keeps_roles_and_drops_extra_fields():
    records, report = _load(DATA / "messages.jsonl")
    assert report.format == "messages" and report.format_origin.endswith("messages.jsonl:1")
    assert [r.origin.rsplit("/", 1)[1] for r in records] == ["messages.jsonl:1", "messages.jsonl:2",
                                                            "messages.jsonl:3"]
    assert records[0].messages[0] == {"role": "system", "content": "You answer briefly."}
    assert records[2].messages[1] == {"role": "assistant", "content": "The capital of Ostrana is Lumo."}


def test_sharegpt_roles_are_mapped_and_unknown_speakers_rejected():
    records, report = _load(DATA / "sharegpt.jsonl", max_bad_fraction=0.5)
    assert report.format == "sharegpt"
    assert records[0].messages == [{"role": "system", "content": "You answer briefly."}] + EXPECTED_PAIR
    assert [m["role"] for m in records[1].messages] == ["user", "assistant", "user", "assistant"]
    ((origin, detail),) = report.skipped["unknown role"]
    assert origin.endswith("sharegpt.jsonl:3") and "'bing'" in detail


def test_alpaca_json_array_with_line_of_each_record():
    records, report = _load(DATA / "alpaca.json")
    assert report.format == "alpaca"
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["2", "3", "4"]  # the line each object starts on
    assert records[0].messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]
    assert records[1].messages[0] == {"role": "user", "content": "Name the colour of a lime."}  # empty input
    assert records[2].messages[0] == {"role": "system", "content": "You are a translator."}


def test_prompt_completion_strings_and_message_lists():
    records, report = _load(DATA / "prompt_completion.jsonl")
    assert report.format == "prompt_completion"
    assert records[0].messages == EXPECTED_PAIR
    assert [m["role"] for m in records[1].messages] == ["system", "user", "assistant"]


def test_format_setting_overrides_detection(tmp_path):
    path = _jsonl(tmp_path / "both.jsonl", [{"prompt": "Say hi.", "completion": "Hi.", "messages": GOOD["messages"]}])
    (rec,), _ = _load(path)
    assert rec.messages == GOOD["messages"]  # auto: messages wins (ultrachat rows carry both)
    (rec,), report = _load(path, format="prompt_completion")
    assert rec.messages[0]["content"] == "Say hi." and report.format_origin == "data.format"
    with pytest.raises(UserError, match=r"no usable conversations.*no 'instruction' field"):
        _load(DATA / "messages.jsonl", format="alpaca")


def test_unrecognised_fields_name_the_formats(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"odd.jsonl:1 \(fields \['answer', 'question'\].*sharegpt \(conversations\)"):
        _load(path)


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _good_rows(3)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    records, report = _load(tmp_path / "chats.parquet")
    assert [r.messages for r in records] == [r["messages"] for r in rows]
    assert records[2].origin.endswith("chats.parquet#2") and report.total == 3


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "chats.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in _good_rows(2) + ["oops"]).encode()))
    records, report = _load(path, max_bad_fraction=0.5)
    assert len(records) == 2 and report.skipped["not a JSON object"][0][0].endswith("chats.jsonl.gz:3")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b"{}")[:12])
    with pytest.raises(UserError, match="damaged gzip"):
        _load(tmp_path / "bad.jsonl.gz")


def _ultrachat_rows():
    return {"prompt": ["What is 2 plus 3?", "Hi"], "prompt_id": ["a" * 64, "b" * 64],
            "messages": [EXPECTED_PAIR, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]}


def test_hub_dataset_id_passes_split_and_revision_and_ignores_extra_columns(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split=None, revision=None):
        calls.append((path, split, revision))
        return datasets.Dataset.from_dict(_ultrachat_rows())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records, report = load_records(DataConfig(path="HuggingFaceH4/ultrachat_200k", split="train_sft",
                                              revision="8049631"))
    assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft", "8049631")]
    assert report.format == "messages" and "columns" in report.format_origin
    assert records[0].messages == EXPECTED_PAIR and records[1].origin == "HuggingFaceH4/ultrachat_200k[train_sft]#1"


def test_hub_unreachable_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE/HF_DATASETS_OFFLINE: the real load_dataset path, no network.
    with pytest.raises(UserError, match=r"unreachable and the dataset is not cached.*hf download.*local file"):
        load_records(DataConfig(path="qlora-phi3-tests/not-a-dataset", split="train"))


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.DatasetDict({"train_sft": datasets.Dataset.from_dict(_ultrachat_rows())}).save_to_disk(tmp_path / "uc")
    records, _ = load_records(DataConfig(path=str(tmp_path / "uc"), split="train_sft"))
    assert records[0].messages == EXPECTED_PAIR
    with pytest.raises(UserError, match=r"no split 'train'; it has train_sft"):
        load_records(DataConfig(path=str(tmp_path / "uc"), split="train"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        _load(tmp_path / "plain")


# ---- validation: each case on its own line of tests/data/bad_records.jsonl ----

def test_every_bad_record_is_reported_with_its_line():
    records, report = _load(DATA / "bad_records.jsonl", max_bad_fraction=1.0)
    by_line = {origin.rsplit(":", 1)[1]: reason for reason, hits in report.skipped.items() for origin, _ in hits}
    assert by_line == {
        "2": "malformed JSON", "3": "missing role", "4": "unknown role", "5": "non-string content",
        "6": "empty content", "7": "no assistant turn", "8": "assistant turn first", "9": "repeated role",
        "10": "system turn not first", "11": "missing content", "12": "not a JSON object",
        "13": "no 'messages' field", "15": "empty conversation",
    }
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["1"]
    assert report.total == 15 and report.n_bad == 13
    ((dup, first),) = report.duplicates
    assert dup.endswith("bad_records.jsonl:14") and first.endswith("bad_records.jsonl:1")
    summary = "\n".join(report.summary_lines())
    assert "1 x malformed JSON: " in summary and "bad_records.jsonl:2 (Expecting ',' delimiter at column 75)" in summary
    assert "exact duplicate, skipped: " in summary and "(same as " in summary


def test_turn_problem_explains():
    assert turn_problem(GOOD["messages"]) is None
    assert str(turn_problem([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                             {"role": "assistant", "content": "c"}])) == \
        "repeated role: messages 0 and 1 are both user"
    assert str(turn_problem([{"role": "robot", "content": "x"}])).startswith("unknown role")
    assert str(turn_problem([{"role": "tool", "content": "x"}])).startswith("tool turn")


def test_special_token_text_is_skipped_naming_the_token_and_line(tmp_path):
    """Phi-3's tokenizer turns the text "<|end|>" into the end-of-turn token wherever it appears, so a reply
    holding it would end its loss span early; such records are skipped, with the token and file:line."""
    rows = _good_rows(8)
    rows.insert(1, {"messages": [{"role": "user", "content": "How do turns end?"},
                                 {"role": "assistant", "content": "With <|end|>, like this."}]})
    rows.insert(3, {"messages": [{"role": "user", "content": "Echo <|user|>"}, {"role": "assistant", "content": "No."}]})
    records, report = _load(_jsonl(tmp_path / "specials.jsonl", rows), max_bad_fraction=0.25)
    assert len(records) == 8
    hits = report.skipped["special token in text"]
    assert [origin.rsplit("/", 1)[1] for origin, _ in hits] == ["specials.jsonl:2", "specials.jsonl:4"]
    assert "message 1 (assistant) contains '<|end|>'" in hits[0][1] and "message 0 (user) contains '<|user|>'" in hits[1][1]
    assert "2 x special token in text: " in report.summary_lines()[0]
    with pytest.raises(UserError, match=r"specials.jsonl:2: special token in text: .*'<\|end\|>'"):
        _load(tmp_path / "specials.jsonl", strict=True)


def test_openai_exports_text_parts_tool_turns_and_a_trailing_user_turn(tmp_path):
    """What OpenAI-style exports hold: text parts are joined; image parts, tool calls and tool results are skipped
    with a reason that names them; a trailing user turn (nothing answers it) is dropped and reported."""
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2 "},
                                                         {"type": "text", "text": "plus 3?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "2 plus 3 is 5."}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    call = {"messages": [{"role": "user", "content": "Weather in Lumo?"},
                         {"role": "assistant", "content": None,
                          "tool_calls": [{"id": "1", "type": "function", "function": {"name": "weather"}}]},
                         {"role": "tool", "tool_call_id": "1", "content": "sunny"},
                         {"role": "assistant", "content": "Sunny."}]}
    result = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"},
                           {"role": "assistant", "content": "Hello."}]}
    pair = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7."}]
    trailing = {"messages": [*pair, {"role": "user", "content": "And 4 plus 5?"}]}
    path = _jsonl(tmp_path / "openai.jsonl", [parts, image, call, result, trailing, *_good_rows(5)])
    records, report = _load(path, max_bad_fraction=0.5)
    assert records[0].messages == EXPECTED_PAIR
    assert records[1].messages == pair and records[1].origin.endswith("openai.jsonl:5")
    assert len(records) == 7
    by_line = {o.rsplit(":", 1)[1]: (reason, detail) for reason, hits in report.skipped.items() for o, detail in hits}
    assert by_line["2"][0] == "non-text content part" and "'image_url' part" in by_line["2"][1]
    assert by_line["3"][0] == "tool call" and "message 1 (assistant) has 'tool_calls'" in by_line["3"][1]
    assert by_line["4"][0] == "tool turn" and "message 1 has role 'tool'" in by_line["4"][1]
    assert [o.rsplit("/", 1)[1] for o in report.trailing_user] == ["openai.jsonl:5"]
    assert any("1 conversation ends with a user turn (e.g. " in n and "openai.jsonl:5" in n for n in report.notes)


def test_duplicates_kept_when_asked(tmp_path):
    path = _jsonl(tmp_path / "dups.jsonl", [GOOD, GOOD, GOOD])
    records, report = _load(path)
    assert len(records) == 1 and len(report.duplicates) == 2 and report.n_skipped == 2 and report.n_bad == 0
    records, report = _load(path, drop_duplicates=False)
    assert len(records) == 3 and report.n_skipped == 0 and "kept" in report.summary_lines()[0]


# ---- policy ----

def test_strict_fails_on_the_first_bad_record():
    with pytest.raises(UserError, match=r"bad_records.jsonl:2: malformed JSON.*data.strict=false"):
        _load(DATA / "bad_records.jsonl", strict=True)


def test_too_many_bad_records_fails_with_the_summary(tmp_path):
    path = _jsonl(tmp_path / "some_bad.jsonl", _good_rows(8) + [{"messages": []}] * 2)
    with pytest.raises(UserError, match=r"2 of 10 records are bad \(20%, more than data.max_bad_fraction=0.1\): "
                                        r"2 x empty conversation: .*some_bad.jsonl:9"):
        _load(path)
    records, report = _load(path, max_bad_fraction=0.2)  # exactly at the limit is allowed
    assert len(records) == 8 and report.n_bad == 2


def test_nothing_usable_fails(tmp_path):
    path = _jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(UserError, match=r"no usable conversations \(1 x no assistant turn"):
        _load(path, max_bad_fraction=1.0)


# ---- bytes on disk ----

def test_bom_crlf_and_blank_lines_are_handled_and_noted(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(r).encode() for r in _good_rows(2)) + b"\r\n")
    records, report = _load(path)
    assert len(records) == 2 and report.n_bad == 0
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["1", "3"]  # blank line 2 still counts as a line
    notes = " | ".join(report.notes)
    assert "BOM" in notes and "CRLF" in notes and "1 blank line ignored" in notes


def test_non_utf8_line_is_skipped_with_its_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    rows = [json.dumps(r).encode() for r in _good_rows(9)]
    rows.insert(1, '{"messages": [{"role": "user", "content": "café"}]}'.encode("latin-1"))
    path.write_bytes(b"\n".join(rows))
    records, report = _load(path)
    ((origin, detail),) = report.skipped["not UTF-8"]
    assert origin.endswith("latin1.jsonl:2") and "0xe9" in detail and "UTF-8" in detail and len(records) == 9


def test_utf16_file_is_refused_with_a_fix(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(json.dumps(GOOD).encode("utf-16"))
    with pytest.raises(UserError, match="UTF-16.*save it as UTF-8"):
        _load(path)


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "empty.jsonl").write_bytes(content)
    with pytest.raises(UserError, match="the data file is empty"):
        _load(tmp_path / "empty.jsonl")


def test_broken_json_array_names_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(UserError, match=r"broken.json:3: malformed JSON array \(Expecting ',' delimiter"):
        _load(path)
    (tmp_path / "empty_array.json").write_text("[ ]")
    with pytest.raises(UserError, match="no usable conversations"):
        _load(tmp_path / "empty_array.json")


def test_pretty_printed_single_object_is_explained(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(UserError, match="one JSON object spread over several lines"):
        _load(path)


def test_missing_file_and_unreadable_parquet(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        _load(tmp_path / "nope.jsonl")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        _load(tmp_path / "fake.parquet")


def test_over_long_samples_count_lost_assistant_tokens(tiny_tokenizer):
    from qlora_phi3.data.encode import encode_conversation, encode_records
    from qlora_phi3.phi3 import IGNORE_INDEX

    records, _ = _load(DATA / "messages.jsonl")
    full = [encode_conversation(tiny_tokenizer, r.messages) for r in records]
    _, longest = max(full, key=lambda f: len(f[0]))
    max_len = max(i for i, t in enumerate(longest) if t != IGNORE_INDEX) - 2  # cut inside its last reply
    enc = encode_records(records, tiny_tokenizer, max_len)
    expected_lost = sum(sum(1 for t in lab[max_len:] if t != IGNORE_INDEX) for _, lab in full)
    assert enc.truncated == sum(len(ids) > max_len for ids, _ in full) >= 1
    assert enc.assistant_tokens_lost == expected_lost >= 3


def test_a_csv_file_is_refused_as_a_whole_not_line_by_line(tmp_path):
    from qlora_phi3.config import DataConfig
    from qlora_phi3.data.read import load_records

    csv = tmp_path / "chats.csv"
    csv.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(90)))
    with pytest.raises(UserError) as e:
        load_records(DataConfig(path=str(csv)))
    assert "CSV is not a supported data format; convert it to JSONL" in str(e.value)
    assert "malformed" not in str(e.value)
    ok = tmp_path / "really_jsonl.txt"  # the suffix alone does not decide: JSON inside is read
    ok.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    records, _ = load_records(DataConfig(path=str(ok)))
    assert len(records) == 1


def test_json_error_text_reads_well(tmp_path):
    from qlora_phi3.config import DataConfig
    from qlora_phi3.data.read import load_records

    bad = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    bad.write_text('{"messages": "unterminated\n' + good * 20)
    _, report = load_records(DataConfig(path=str(bad)))
    text = "\n".join(report.summary_lines())
    assert "starting at column" in text and "at at" not in text
