"""The bundled synthetic chat data set that the tiny model can measurably learn.

Deterministic (seeded) so that the shipped file and the expected answers in tests agree. Regenerate
with ``python -m qlora_phi3.data.synthetic OUT.jsonl``.

Three tasks with a fixed answer shape, so that a small model trained for a minute learns them and a
person can check an answer by eye:
  * capitals of made-up countries ("What is the capital of Zorvia?" -> "The capital of Zorvia is Quellan."),
  * one-digit sums ("What is 3 plus 4?" -> "3 plus 4 is 7."),
  * colours of things ("What color is a banana?" -> "A banana is yellow.").
The preference sets (``tiny_prefs.jsonl``, ``tiny_kto.jsonl``) ask the same questions and pair the right answer
(chosen / label true) with a wrong one of the same shape (rejected / label false), or, for half the pairs, an
evasive non-answer. GRPO's prompt set (``tiny_sums.jsonl``) asks the sums in another wording ("What do 3 and 4
make?") with the sum as an ``answer`` column, and :func:`answer_shape` is its format reward.
Some conversations carry a system prompt and some are multi-turn, so that masking is exercised on
every assistant turn.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

__all__ = ["CAPITALS", "COLORS", "answer_for", "answer_shape", "generate", "generate_pairs", "generate_prompts",
           "generate_unpaired", "wrong_answer_for", "write_full_length_conversations", "write_full_length_pairs",
           "write_full_length_prompts", "write_jsonl"]

CAPITALS = {
    "Zorvia": "Quellan", "Maltheon": "Virest", "Korrin": "Dasko", "Elbaria": "Tunmore",
    "Quastor": "Belvin", "Ulmora": "Ferris", "Tavonia": "Graylen", "Nesh": "Opalwick",
    "Drovia": "Hallam", "Pyrenn": "Istova", "Sarkand": "Jovel", "Vellum": "Kestrel",
    "Ostrana": "Lumbar", "Brevonia": "Morrow", "Caldis": "Nimbus", "Fenwick": "Orlan",
}
COLORS = {
    "banana": "yellow", "lime": "green", "cherry": "red", "plum": "purple", "sky": "blue",
    "coal": "black", "snow": "white", "carrot": "orange", "chocolate": "brown", "rose": "pink",
}
EVASIVE_ANSWERS = ["I am not sure.", "That is a hard question.", "I cannot answer that.", "Please ask someone else."]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer in one short sentence.", "You are a quiz bot."]


def _task(question: str):
    """(the answer up to its fact, the right fact, the wrong ones) for one of the tasks' questions, else None."""
    for country, capital in CAPITALS.items():
        if question == f"What is the capital of {country}?":
            return f"The capital of {country} is ", capital, sorted(set(CAPITALS.values()) - {capital})
    for thing, color in COLORS.items():
        if question == f"What color is a {thing}?":
            return f"A {thing} is ", color, sorted(set(COLORS.values()) - {color})
    words = question.rstrip("?").split()
    if len(words) == 5 and words[:2] == ["What", "is"] and words[3] == "plus":
        a, b = int(words[2]), int(words[4])
        return f"{a} plus {b} is ", a + b, [s for s in range(19) if s != a + b]
    return None


def answer_for(question: str) -> str | None:
    """The answer the training data gives to ``question`` (None if it is not one of the tasks)."""
    task = _task(question)
    return None if task is None else f"{task[0]}{task[1]}."


def wrong_answer_for(question: str, rng: random.Random) -> str:
    """An answer of the same shape as ``answer_for(question)`` but wrong: another capital, sum or colour. The
    preference sets pair it with the right one, so the only thing that tells chosen from rejected is the fact."""
    start, _, wrong = _task(question)
    return f"{start}{rng.choice(wrong)}."


def _distinct(n: int, seed: int, draw) -> list[dict]:
    """``n`` records, the same for the same seed, none twice (duplicates would be skipped by the data validation and
    leak into the eval split). ``draw(rng, i)`` draws the ``i``-th candidate: its key, and a function that makes the
    record, called only when the key is new (what it draws comes after the check, so the sets stay as shipped)."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:
        key, make = draw(rng, len(records))
        if key not in seen:
            seen.add(key)
            records.append(make())
    return records


def generate_pairs(n: int = 600, seed: int = 1) -> list[dict]:
    """``n`` distinct preference pairs in TRL's conversational format (``prompt`` turns, ``chosen`` / ``rejected``
    assistant turns): chosen is the right answer, rejected a wrong one of the same shape or an evasive one. A few carry a system
    prompt or an earlier exchange, so the prompt is not always one turn."""
    def draw(rng: random.Random, _i: int):
        prompt = []
        if rng.random() < 0.3:
            prompt.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if rng.random() < 0.2:
            earlier = _question(rng)
            prompt += [{"role": "user", "content": earlier}, {"role": "assistant", "content": answer_for(earlier)}]
        question = _question(rng)
        prompt.append({"role": "user", "content": question})

        def make() -> dict:
            # Half the rejected answers get the fact wrong; the other half dodge the question. The first kind is
            # only learned per fact, the second as a rule, so held-out pairs show learning after a couple of minutes.
            rejected = wrong_answer_for(question, rng) if rng.random() < 0.5 else rng.choice(EVASIVE_ANSWERS)
            return {"prompt": prompt, "chosen": [{"role": "assistant", "content": answer_for(question)}],
                    "rejected": [{"role": "assistant", "content": rejected}]}

        return json.dumps(prompt), make

    return _distinct(n, seed, draw)


def generate_unpaired(n: int = 400, seed: int = 2) -> list[dict]:
    """``n`` KTO records (``prompt``, ``completion``, boolean ``label``): half right answers (true), half wrong (false).
    There are 126 questions, so some prompts carry a system prompt to keep every record distinct."""
    def draw(rng: random.Random, i: int):
        question = _question(rng)
        good = i % 2 == 0
        answer = answer_for(question) if good else wrong_answer_for(question, rng)
        system = rng.choice([None, *SYSTEM_PROMPTS])
        prompt = [{"role": "system", "content": system}] if system else []
        return (system, question, answer), lambda: {"prompt": prompt + [{"role": "user", "content": question}],
                                                    "completion": [{"role": "assistant", "content": answer}],
                                                    "label": good}

    return _distinct(n, seed, draw)


def _question(rng: random.Random) -> str:
    task = rng.choice(["capital", "sum", "color"])
    if task == "capital":
        return f"What is the capital of {rng.choice(sorted(CAPITALS))}?"
    if task == "color":
        return f"What color is a {rng.choice(sorted(COLORS))}?"
    return f"What is {rng.randrange(10)} plus {rng.randrange(10)}?"


def generate(n: int = 1200, seed: int = 0) -> list[dict]:
    """``n`` distinct OpenAI-style conversations, the same for the same seed."""
    def draw(rng: random.Random, _i: int):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _turn in range(1 if rng.random() < 0.7 else 2):
            question = _question(rng)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer_for(question)})
        return json.dumps(messages), lambda: {"messages": messages}

    return _distinct(n, seed, draw)


def generate_prompts() -> list[dict]:
    """GRPO's prompt set (``tiny_sums.jsonl``): each of the 100 one-digit sums, with the sum in an ``answer`` column
    for the ``numeric_answer`` reward, in a fixed shuffled order (seeded). Asked as the chat set never asks them
    ("What do 3 and 4 make?"): the SFT adapter knows the sums but answers this wording in its own shape only some of
    the time ("3 plus 4." and stop, or "3 plus 4 is 7."), a rule that held-out prompts share, so GRPO has something
    to teach that carries over to them (docs/grpo.md, Offline on a CPU)."""
    records = [{"prompt": [{"role": "user", "content": f"What do {a} and {b} make?"}], "answer": str(a + b)}
               for a in range(10) for b in range(10)]
    random.Random(3).shuffle(records)
    return records


def _text_of(turns) -> str:
    """A prompt's last turn or a completion as text: TRL hands chat prompts and completions as lists of messages."""
    if isinstance(turns, list):
        return str(turns[-1].get("content", "")) if turns and isinstance(turns[-1], dict) else ""
    return str(turns)


_OPERANDS = re.compile(r"\d+")


def answer_shape(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
    """A GRPO reward (TRL's signature) for the sums: 1.0 when the answer has the chat set's shape for the question's
    two numbers, "3 plus 4 is <a number>.", right or wrong, else 0.0; None for a prompt without two numbers.
    ``tiny_cpu_grpo`` names it beside ``numeric_answer`` as ``qlora_phi3.data.synthetic:answer_shape``: the sum
    rewards the fact, this the format, as a reasoning recipe pairs a format reward with an accuracy one."""
    scores: list[float | None] = []
    for prompt, completion in zip(prompts, completions):
        numbers = _OPERANDS.findall(_text_of(prompt))
        if len(numbers) < 2:
            scores.append(None)
            continue
        shape = rf"\s*{numbers[0]} plus {numbers[1]} is [-+]?\d+\.\s*"
        scores.append(1.0 if re.fullmatch(shape, _text_of(completion)) else 0.0)
    return scores


def write_full_length_conversations(path: Path, tokenizer, n: int, n_tokens: int, seed: int = 0) -> Path:
    """``n`` distinct conversations, each at least ``n_tokens`` tokens long in the chat template and nearly all
    of it assistant reply (so nearly every token carries loss): truncated to ``n_tokens``, every sample is
    exactly that long. For measuring a training step's worst case at a sequence length (the profiler)."""
    rng = random.Random(seed)
    sentences = [answer_for(_question(rng)) for _ in range(256)]
    tokens_each = len(tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]) / len(sentences)
    needed = int(n_tokens / tokens_each * 1.1) + 8  # 10% spare: truncation cuts it to exactly n_tokens
    records = []
    for i in range(n):
        reply = " ".join(rng.choice(sentences) for _ in range(needed))
        records.append({"messages": [{"role": "user", "content": f"Recite quiz answers, set {i}."},
                                     {"role": "assistant", "content": reply}]})
    write_jsonl(path, records)
    return path


def write_full_length_pairs(path: Path, tokenizer, n: int, n_tokens: int, seed: int = 0, unpaired: bool = False) -> Path:
    """``n`` preference pairs (or, ``unpaired``, 2n KTO records, labels alternating) whose prompt is one short turn and
    whose chosen and rejected answers each fill ``n_tokens`` once truncated: every row of a micro-batch is exactly
    ``n_tokens`` long and nearly all of it answer. The profiler's worst case for the preference methods."""
    rng = random.Random(seed)
    sentences = [answer_for(_question(rng)) for _ in range(256)]
    tokens_each = len(tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]) / len(sentences)
    needed = int(n_tokens / tokens_each * 1.1) + 8

    def answer() -> str:
        return " ".join(rng.choice(sentences) for _ in range(needed))

    records = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Recite quiz answers, set {i}."}]
        if unpaired:  # distinct prompts, so the held-out split keeps one
            records += [{"prompt": [{"role": "user", "content": f"Recite quiz answers, set {i}{part}."}],
                         "completion": [{"role": "assistant", "content": answer()}], "label": good}
                        for part, good in (("a", True), ("b", False))]
        else:
            records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer()}],
                            "rejected": [{"role": "assistant", "content": answer()}]})
    write_jsonl(path, records)
    return path


def write_full_length_prompts(path: Path, tokenizer, n: int, n_tokens: int, seed: int = 0) -> Path:
    """``n`` distinct grpo prompt records (one user turn ending with a one-digit sum, the sum in an ``answer``
    column) each ``n_tokens`` tokens long in the chat template with the generation prompt, or a few tokens
    shorter where no word boundary lands exactly: a prompt is never cut (its end is the question), so the filler
    before the question is sized to fill the limit. The profiler's worst case for grpo, where the prompt limit is
    ``data.max_seq_len - train.max_completion_len``. Raises ValueError when not even the question fits."""
    from qlora_phi3.data.prompts import PromptRecord, prompt_token_ids

    rng = random.Random(seed)
    words = " ".join(answer_for(_question(rng)) for _ in range(max(8, n_tokens // 4))).split()
    records = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        question = f"Set {i}. What is {a} plus {b}?"

        def length(k: int) -> int:  # the templated prompt with k filler words before the question
            text = " ".join(words[:k] + [question])
            return len(prompt_token_ids(tokenizer, PromptRecord([{"role": "user", "content": text}], {}, "")))

        if length(0) > n_tokens:
            raise ValueError(f"a prompt of {n_tokens} tokens cannot hold the question ({length(0)} tokens)")
        lo, hi = 0, len(words)  # the most filler words that fit: length() grows with k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(mid) <= n_tokens else (lo, mid - 1)
        records.append({"prompt": [{"role": "user", "content": " ".join(words[:lo] + [question])}],
                        "answer": str(a + b)})
    write_jsonl(path, records)
    return path


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":  # pragma: no cover - regeneration entry point
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_chat.jsonl")
    write_jsonl(out, generate())
    write_jsonl(out.with_name("tiny_prefs.jsonl"), generate_pairs())
    write_jsonl(out.with_name("tiny_kto.jsonl"), generate_unpaired())
    write_jsonl(out.with_name("tiny_sums.jsonl"), generate_prompts())
