"""Answers on your own held-out chats, no lm-eval needed: for each conversation, the greedy answer to its last user
turn from each model (the same generation as ``chat`` and training's sample answers: qlora_phi3/model/generate.py,
the model's chat template and stop tokens), scored against the conversation's own last answer by exact match and
token F1 (SQuAD's definitions: lower case, punctuation and English articles dropped, whitespace tokens).

The conversations come from any file the data layer reads (``--data FILE``, checked line by line: a broken line is
one error with its file:line), or from the run's own held-out split (``--data`` alone), rebuilt as training built it.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass

from qlora_phi3.errors import UserError

__all__ = ["Prompt", "answers_jsonl", "exact_match", "generate_answers", "held_out_prompts", "prompts_from_file",
           "score_answers", "token_f1"]


@dataclass
class Prompt:
    messages: list[dict]  # the conversation up to and including its last user turn
    reference: str  # the answer the data gives to it
    origin: str  # file:line (or the data set's row)


def _prompts(records) -> list[Prompt]:
    # The data layer drops a trailing user turn, so every record ends with the assistant's answer to a user turn.
    return [Prompt(r.messages[:-1], r.messages[-1]["content"], r.origin) for r in records]


def prompts_from_file(path: str, limit: int | None = None) -> list[Prompt]:
    """Every conversation of ``path`` (any format and file type the data layer reads), strictly: the first bad
    record is an error naming its file:line."""
    from qlora_phi3.config import DataConfig
    from qlora_phi3.data.read import load_records

    records, _ = load_records(DataConfig(path=path, strict=True, drop_duplicates=False))
    return _prompts(records[:limit] if limit else records)


def held_out_prompts(recipe, run: dict | None, tokenizer, limit: int | None = None) -> tuple[list[Prompt], str]:
    """The run's own held-out conversations (data/split.py, as training split them) and where they came from."""
    from qlora_phi3.data.split import held_out_records

    if recipe is None:
        raise UserError("--data without a file uses a run's held-out split; TARGET is not a run with its recipe.yaml. "
                        "Give --data FILE (a JSONL of conversations).")
    records, where = held_out_records(recipe, run, tokenizer, recipe.data.max_seq_len,
                                      limit or recipe.data.max_eval_samples)
    return _prompts(records), where


def _normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(answer: str, reference: str) -> bool:
    return _normalize(answer) == _normalize(reference)


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalized words (SQuAD's F1)."""
    got, want = _normalize(answer).split(), _normalize(reference).split()
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def generate_answers(model, tokenizer, prompts: list[Prompt], max_new_tokens: int) -> list[dict]:
    """Greedy answers of ``model`` (in the state the caller holds it in) to each prompt: text and whether it ended
    with an end-of-turn token."""
    import torch

    from qlora_phi3.model.generate import greedy_answer

    out = []
    with torch.no_grad():
        for p in prompts:
            text, ended = greedy_answer(model, tokenizer, p.messages, max_new_tokens)
            out.append({"answer": text, "ended": ended})
    return out


def score_answers(prompts: list[Prompt], answers: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """Rows side by side (prompt, reference, each model's answer with its exact match and F1) for answers.jsonl,
    and each model's mean exact match and F1."""
    rows, totals = [], {}
    for i, p in enumerate(prompts):
        row = {"origin": p.origin, "prompt": p.messages[-1]["content"], "reference": p.reference}
        for label, answered in answers.items():
            a = answered[i]
            row[label] = a["answer"]
            row[f"{label}_exact_match"] = exact_match(a["answer"], p.reference)
            row[f"{label}_f1"] = round(token_f1(a["answer"], p.reference), 4)
            row[f"{label}_ended"] = a["ended"]
        rows.append(row)
    for label in answers:
        n = max(1, len(rows))
        totals[label] = {"exact_match": sum(r[f"{label}_exact_match"] for r in rows) / n,
                         "token_f1": sum(r[f"{label}_f1"] for r in rows) / n, "n": len(rows)}
    return rows, totals


def answers_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
