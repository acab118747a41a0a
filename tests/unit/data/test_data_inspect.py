"""``qlora-phi3 data``: its numbers agree with what training sees, the loss mask it shows is the real one,
and a data problem is one clean line, never a traceback."""

import json
import math
from pathlib import Path

import pytest

from qlora_phi3.config import load_recipe
from qlora_phi3.data.read import ChatRecord
from qlora_phi3.errors import UserError
from qlora_phi3.cli.render_data import print_data_inspection, render_sample, text_histogram
from qlora_phi3.data.inspect import inspect_data, percentile, sample_tokens

REPO = Path(__file__).resolve().parents[3]
DATA = Path(__file__).resolve().parents[2] / "data"


def _chat_file(path: Path) -> Path:
    """20 conversations of varied length (1 to 4 exchanges), so a small max_seq_len cuts some of them."""
    rows = []
    for i in range(20):
        msgs = []
        for j in range(1 + i % 4):
            msgs += [{"role": "user", "content": f"What is {i} plus {j}?"},
                     {"role": "assistant", "content": f"{i} plus {j} is {i + j}, as anyone can check."}]
        rows.append({"messages": msgs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _recipe(tmp_path, *overrides):
    return load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [
        f"data.path={_chat_file(tmp_path / 'chats.jsonl')}", "data.max_seq_len=60", "data.eval_fraction=0.1",
        "train.micro_batch_size=3", "train.grad_accum=2", f"train.output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("packing", ["true", "false"])
def test_numbers_agree_with_training_and_files_land_beside_the_run(tmp_path, capsys, tiny_tokenizer, packing):
    from qlora_phi3.data.read import load_records
    from qlora_phi3.data.encode import encode_records
    from qlora_phi3.data.packing import pack_columns, padding_advice
    from qlora_phi3.run.methods.sft import load_data as _load_data

    recipe = _recipe(tmp_path, f"data.packing={packing}")
    res = inspect_data(recipe, tiny_tokenizer, sample=2)
    assert capsys.readouterr().out == ""  # the numbers are returned; the command prints them

    records, _ = load_records(recipe.data)
    everything = encode_records(records, tiny_tokenizer, 60)
    assert res.usable == 20 and res.truncated == everything.truncated > 0
    assert res.assistant_tokens_lost == everything.assistant_tokens_lost > 0 and res.dropped == everything.dropped
    train_enc = _load_data(recipe, tiny_tokenizer).train  # exactly what training would feed the model
    assert res.tokens_per_epoch == train_enc.n_tokens and res.loss_tokens_per_epoch == train_enc.n_label_tokens
    if packing == "true":  # the rows the trainer is given (run/methods/sft.py packs with pack_columns)
        rows = len(pack_columns(train_enc.input_ids, train_enc.labels, 60)["input_ids"])
        assert res.packed_rows == rows < len(train_enc.input_ids) and res.padded_share is None
    else:  # the padding share is the one train prints, for the recipe's micro-batch of 3
        rows = len(train_enc.input_ids)
        share, line, _ = padding_advice([len(x) for x in train_enc.input_ids], 3, recipe.train.seed)
        assert res.padded_share == share > 0 and res.packed_rows is None and res.padding_note == line
    assert res.steps_per_epoch == math.ceil(math.ceil(rows / 3) / 2)
    assert res.train_samples == 18 and res.eval_samples == 2
    assert res.percentiles["p100"] == max(res.token_lengths) > 60 and res.percentiles["p50"] < res.percentiles["p100"]
    assert res.end_unlabelled == []  # Phi-3's template: every assistant <|end|> carries a label
    assert res.sample.index == 2 and res.sample.origin.endswith("chats.jsonl:3")

    # Beside the run directory, never inside it (training refuses a non-empty non-run output_dir).
    png, report = tmp_path / "run-data" / "token_lengths.png", tmp_path / "run-data" / "data_report.json"
    assert not (tmp_path / "run").exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(report.read_text())
    assert saved["truncated"] == res.truncated and saved["steps_per_epoch"] == res.steps_per_epoch
    assert res.png_path == str(png) and res.json_path == str(report)

    print_data_inspection(res, recipe)  # what `qlora-phi3 data` shows of it
    out = capsys.readouterr().out
    assert "sample 2 (" in out and "chats.jsonl:3)" in out
    assert f"cuts {res.truncated} of 20 conversations" in out and str(png) in out
    assert "every assistant turn's <|end|> carries a label" in out
    assert f"{res.steps_per_epoch} optimizer steps at micro_batch_size 3 x grad_accum 2" in out
    if packing == "true":
        assert f"packing: {res.packed_rows} rows" in out
    else:
        assert res.padding_note.split(" (")[0] in " ".join(out.split())


def test_render_highlights_exactly_the_replies_and_their_end(tiny_tokenizer):
    from qlora_phi3.data.encode import encode_conversation

    rec = ChatRecord([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
                      {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 4 plus 4?"},
                      {"role": "assistant", "content": "8."}], "x.jsonl:1")
    ids, labels = encode_conversation(tiny_tokenizer, rec.messages)
    sample = sample_tokens(tiny_tokenizer, rec, ids, labels, index=0)
    text = render_sample(sample, max_seq_len=len(ids) - 2, plain=False)

    def styled(pred):
        return "".join(text.plain[s.start:s.end] for s in text.spans if pred(str(s.style)))

    assert text.plain == tiny_tokenizer.apply_chat_template(rec.messages, tokenize=False)
    # <|end|> swallows the newline after it (Phi-3's rstrip), so the newline is part of that loss token.
    assert styled(lambda st: "on green3" in st or "on dark_sea_green2" in st) == "5.<|end|>\n8."
    assert styled(lambda st: st == "strike red") == "<|end|>\n<|endoftext|>"  # the last end is past max_seq_len
    plain = render_sample(sample, max_seq_len=len(ids) - 2, plain=True)
    assert plain == ("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\n"
                     "⟦5.<|end|>⟧\n<|user|>\nAnd 4 plus 4?<|end|>\n<|assistant|>\n⟦8.⟧✂<|end|>\n<|endoftext|>")


def test_render_shows_each_token_once_on_the_real_tokenizer(tiny_tokenizer):
    """Offsets of ▁-prefixed and byte-fallback tokens are not character positions (issue 18 #11): ``0 plus 0``
    rendered as ``00 plus 0`` and one emoji as four. Rendered from the ids, every token shows its own text."""
    from qlora_phi3.data.encode import encode_conversation
    from qlora_phi3.data.inspect import token_texts

    msgs = [{"role": "user", "content": "What is 0 plus 0?"},
            {"role": "assistant", "content": "\n0 plus 0 is 0. 🦙 Ça, 日本 😶‍🌫️\t "}]
    ids, labels = encode_conversation(tiny_tokenizer, msgs)
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
    shown = token_texts(tiny_tokenizer, text, ids)
    assert len(shown) == len(ids) and "".join(shown) == text
    pieces = tiny_tokenizer.convert_ids_to_tokens(ids)
    assert shown[:6] == ["<|user|>\n", "What", " is", " ", "0", " plus"]  # the first ▁ is the normalizer's
    assert shown[pieces.index("<|assistant|>")] == "<|assistant|>\n\n"  # rstrip swallowed the reply's newline
    llama = [k for k, p in enumerate(pieces) if p == "<0xF0>"][0]  # 🦙 = F0 9F A6 99: shown once, on its last byte
    assert shown[llama:llama + 4] == ["", "", "", "🦙"] and text.count("🦙") == "".join(shown).count("🦙") == 1
    plain = render_sample(sample_tokens(tiny_tokenizer, ChatRecord(msgs, "x:1"), ids, labels, 0), 4096, plain=True)
    assert plain == text.replace("\n\n0 plus", "\n\n⟦0 plus").replace("\t <|end|>", "\t <|end|>⟧")


def test_end_label_check_catches_a_template_that_drops_it(tmp_path, monkeypatch, capsys, tiny_tokenizer):
    import qlora_phi3.data.encode as formatting

    real = formatting.encode_conversation

    def no_end_labels(tokenizer, messages, markers=None):
        ids, labels = real(tokenizer, messages, markers)
        end = tokenizer.convert_tokens_to_ids(formatting.END_TOKEN)
        return ids, [formatting.IGNORE_INDEX if i == end else lab for i, lab in zip(ids, labels)]

    monkeypatch.setattr(formatting, "encode_conversation", no_end_labels)
    recipe = _recipe(tmp_path)
    res = inspect_data(recipe, tiny_tokenizer, out_dir=tmp_path / "rep")
    assert len(res.end_unlabelled) == 20
    print_data_inspection(res, recipe)
    assert "carries no label" in capsys.readouterr().out


def test_sample_out_of_range(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match=r"--sample 20: there are 20 usable conversations; pick 0 to 19"):
        inspect_data(_recipe(tmp_path), tiny_tokenizer, sample=20, out_dir=tmp_path / "rep")


def test_text_histogram_and_percentiles():
    lengths = [12, 15, 18, 33, 35, 70]
    rows = text_histogram(lengths, max_seq_len=34, n_bins=6)  # width 20: 0-20, 20-40, 40-60, 60-80
    assert [r.split()[0] for r in rows] == ["0-20", "20-40", "40-60", "60-80"]
    assert [int(r.split("(")[0].split()[-1]) for r in rows] == [3, 2, 0, 1]
    assert rows[1].endswith("(1 cut)") and rows[3].endswith("(cut)") and "cut" not in rows[0] + rows[2]
    # max_seq_len inside a bin whose samples all fit: nothing is marked
    assert not any("cut" in r for r in text_histogram([12, 15, 18, 33, 35], max_seq_len=36, n_bins=6))
    assert [percentile(sorted(lengths), p) for p in (50, 100)] == [18, 70]


def test_cli_data_problem_is_one_line(tmp_path, qlora):
    bad = DATA / "bad_records.jsonl"
    res = qlora("data", f"data.path={bad}", f"train.output_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "13 of 15 records are bad" in res.stderr and "bad_records.jsonl:2" in res.stderr
    res = qlora("train", f"data.path={bad}", "data.strict=true", f"train.output_dir={tmp_path / 'run'}")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "bad_records.jsonl:2: malformed JSON" in res.stderr


def test_cli_data_runs_on_a_recipe(tmp_path, capsys):
    from qlora_phi3.cli import main

    rc = main(["data", str(REPO / "recipes" / "tiny_cpu.yaml"), f"data.path={DATA / 'sharegpt.jsonl'}",
               "data.max_bad_fraction=0.5", "data.eval_fraction=0.4", "--sample", "1", "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "rep" / "token_lengths.png").is_file()
    assert "read as sharegpt" in out and "1 x unknown role" in out and "sharegpt.jsonl:2)" in out
