"""The bundled synthetic chat data set that the tiny model can measurably learn.

Deterministic (seeded) so that the shipped file and the expected answers in tests agree. Regenerate
with ``python -m qlora_phi3.data.synthetic OUT.jsonl``.

Three tasks with a fixed answer shape, so that a small model trained for a minute learns them and a
person can check an answer by eye:
  * capitals of made-up countries ("What is the capital of Zorvia?" -> "The capital of Zorvia is Quellan."),
  * one-digit sums ("What is 3 plus 4?" -> "3 plus 4 is 7."),
  * colours of things ("What color is a banana?" -> "A banana is yellow.").
Some conversations carry a system prompt and some are multi-turn, so that masking is exercised on
every assistant turn.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

__all__ = ["CAPITALS", "COLORS", "answer_for", "generate", "write_jsonl"]

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
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer in one short sentence.", "You are a quiz bot."]


def answer_for(question: str) -> str | None:
    """The answer the training data gives to ``question`` (None if it is not one of the tasks)."""
    for country, capital in CAPITALS.items():
        if question == f"What is the capital of {country}?":
            return f"The capital of {country} is {capital}."
    for thing, color in COLORS.items():
        if question == f"What color is a {thing}?":
            return f"A {thing} is {color}."
    words = question.rstrip("?").split()
    if len(words) == 5 and words[:2] == ["What", "is"] and words[3] == "plus":
        a, b = int(words[2]), int(words[4])
        return f"{a} plus {b} is {a + b}."
    return None


def _question(rng: random.Random) -> str:
    task = rng.choice(["capital", "sum", "color"])
    if task == "capital":
        return f"What is the capital of {rng.choice(sorted(CAPITALS))}?"
    if task == "color":
        return f"What color is a {rng.choice(sorted(COLORS))}?"
    return f"What is {rng.randrange(10)} plus {rng.randrange(10)}?"


def generate(n: int = 1200, seed: int = 0) -> list[dict]:
    """``n`` distinct OpenAI-style conversations, the same for the same seed.

    Distinct because duplicates are skipped by the data validation (and would leak into the eval split)."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _turn in range(1 if rng.random() < 0.7 else 2):
            question = _question(rng)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer_for(question)})
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            records.append({"messages": messages})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":  # pragma: no cover - regeneration entry point
    write_jsonl(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_chat.jsonl"), generate())
