"""eval --data without a model: the conversations it reads (a broken line is one error with its file:line) and the
scores (exact match and token F1, SQuAD's definitions)."""

import json

import pytest

from qlora_phi3.errors import UserError
from qlora_phi3.evaluate.answers import exact_match, prompts_from_file, score_answers, token_f1


def test_scores_follow_squad_normalisation():
    assert exact_match("The capital of Zorvia is Quellan.", "the capital of zorvia is quellan")
    assert not exact_match("The capital of Zorvia is Virest.", "The capital of Zorvia is Quellan.")
    # 4 of 5 normalised words shared ("the" dropped as an article, "." as punctuation): precision = recall = 4/5
    assert token_f1("The capital of Zorvia is Virest.", "The capital of Zorvia is Quellan.") == pytest.approx(4 / 5)
    assert token_f1("", "") == 1.0 and token_f1("anything", "") == 0.0
    assert token_f1("3 plus 4 is 7.", "3 plus 4 is 7.") == 1.0


def test_prompts_are_everything_before_the_last_answer(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 plus 2?"},
        {"role": "assistant", "content": "1 plus 2 is 3."}, {"role": "user", "content": "And 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."}]}) + "\n")
    prompts = prompts_from_file(str(path))
    assert len(prompts) == 1 and prompts[0].reference == "2 plus 2 is 4."
    assert [m["role"] for m in prompts[0].messages] == ["system", "user", "assistant", "user"]
    assert prompts[0].origin == f"{path}:1"
    rows, totals = score_answers(prompts, {"base": [{"answer": "no idea", "ended": True}],
                                           "finetune": [{"answer": "2 plus 2 is 4.", "ended": True}]})
    assert rows[0]["finetune_exact_match"] and not rows[0]["base_exact_match"]
    assert totals["finetune"] == {"exact_match": 1.0, "token_f1": 1.0, "n": 1}


def test_a_broken_line_is_one_error_with_its_file_and_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]})
    path.write_text(f"{good}\n{good[:-5]}\n{good}\n")
    with pytest.raises(UserError, match=rf"{path}:2\b"):
        prompts_from_file(str(path))
