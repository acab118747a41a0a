"""``qlora-phi3 chat`` on the trained tiny model: it answers the bundled tasks the way its training data does,
keeps the conversation in interactive mode, and stops at <|end|>."""

from __future__ import annotations

import io

import pytest

from qlora_phi3.cli import main
from qlora_phi3.data.synthetic import answer_for


@pytest.mark.slow  # reuses the session's trained run
def test_chat_prompt_answers_like_training_data(tiny_run, capsys):
    _, run = tiny_run
    q = "What is the capital of Zorvia?"
    assert main(["chat", str(run.output_dir), "--prompt", q]) == 0  # a run dir: adapter on the 4-bit base
    captured = capsys.readouterr()
    # stdout holds exactly the answer: streamed tokens, no special tokens, nothing after <|end|>
    assert captured.out.strip() == answer_for(q) == "The capital of Zorvia is Quellan."
    assert "4-bit" in captured.err and "warning" not in captured.err


@pytest.mark.slow  # reuses the session's trained run
def test_interactive_chat_keeps_history_and_ends_on_empty_line(tiny_run, monkeypatch, capsys):
    from qlora_phi3.out.chat import chat

    _, run = tiny_run
    questions = ["What is 3 plus 4?", "What color is a plum?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(questions) + "\n\nWhat is 1 plus 1?\n"))
    messages = chat(str(run.adapter_dir), system="You are a quiz bot.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    # The tiny model's sums are not always right (under this system prompt it says 3 plus 4 is 6); the form of the
    # answer and the fact are what it reliably learned.
    sum_answer, fact_answer = (m["content"] for m in messages[2::2])
    assert sum_answer.startswith("3 plus 4 is ") and sum_answer.endswith(".") and fact_answer == answer_for(questions[1])
    out = capsys.readouterr().out
    assert sum_answer in out and fact_answer in out and "1 plus 1" not in out  # stopped at the empty line


@pytest.mark.slow  # reuses the session's trained run
def test_answer_cut_by_max_new_tokens_is_reported(tiny_run, capsys):
    _, run = tiny_run
    assert main(["chat", str(run.adapter_dir), "--prompt", "What is 3 plus 4?", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.out.strip() != answer_for("What is 3 plus 4?")
    assert "without an end-of-turn token" in captured.out + captured.err


def test_chat_refuses_a_path_that_is_not_a_model(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no such file or directory" in err and "Traceback" not in err


@pytest.mark.slow  # reuses the session's trained run
def test_generation_prompt_and_stop_ids_are_phi3s(tiny_run):
    from qlora_phi3.out.chat import load_chat_model

    _, run = tiny_run
    cm = load_chat_model(str(run.adapter_dir))
    assert cm.stop_ids == [32007, 32000]  # <|end|>, <|endoftext|>
    msgs = [{"role": "user", "content": "What is 3 plus 4?"}]
    assert cm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith(
        "<|end|>\n<|assistant|>\n")
    ids = cm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[-2:] == [32007, 32001]


@pytest.mark.parametrize("emitted, stops", [(32007, True), (32000, True), (6324, False)])
def test_generation_stops_at_end_and_endoftext(emitted, stops, capsys):
    """A model that always emits one token: <|end|> or <|endoftext|> end the answer at once; any other token
    runs to --max-new-tokens and is reported."""
    import torch

    from qlora_phi3.model.tiny import TINY_MODEL_DIR
    from qlora_phi3.out.chat import load_chat_model, reply

    cm = load_chat_model(str(TINY_MODEL_DIR))  # a plain model directory, as a merged model is
    old = cm.model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[emitted] = 10.0
    cm.model.lm_head = head
    answer = reply(cm, [{"role": "user", "content": "Hi"}], max_new_tokens=4, stream=False)
    cut = "without an end-of-turn token" in capsys.readouterr().out
    assert (answer, cut) == (("", False) if stops else ("Hi Hi Hi Hi", True))
