"""The documents of the shipped lm-eval task ``tiny_chat_facts``: every fact of the bundled tiny chat set
(qlora_phi3/data/synthetic.py: 16 capitals, 10 colours, 100 one-digit sums) as a four-way multiple choice between
the answer the data teaches and three of the same shape that get the fact wrong.

The task YAML (qlora_phi3/assets/lm_eval_tasks/tiny_chat_facts/) names :func:`dataset` as its ``custom_dataset``,
so the task needs no file and no network: ``qlora-phi3 eval runs/tiny --tasks tiny_chat_facts`` works on a fresh
machine, and lm-eval's own CLI runs it too (``--include_path`` that folder). The facts are those the tiny run
trains on, so the task shows whether the fine-tune learned them, not whether it generalises.
"""

from __future__ import annotations

import random

from qlora_phi3.data.synthetic import CAPITALS, COLORS, answer_for, wrong_answer_for

__all__ = ["N_CHOICES", "dataset", "documents"]

N_CHOICES = 4


def _questions() -> list[str]:
    return ([f"What is the capital of {country}?" for country in sorted(CAPITALS)]
            + [f"What color is a {thing}?" for thing in sorted(COLORS)]
            + [f"What is {a} plus {b}?" for a in range(10) for b in range(10)])


def documents(seed: int = 0) -> list[dict]:
    """One document per fact: ``question``, ``choices`` (the right answer among wrong ones, seeded order) and
    ``answer`` (the right one's index), the same on every machine."""
    rng = random.Random(seed)
    docs = []
    for question in _questions():
        right = answer_for(question)
        choices = {right}
        while len(choices) < N_CHOICES:
            choices.add(wrong_answer_for(question, rng))
        ordered = sorted(choices)
        rng.shuffle(ordered)
        docs.append({"question": question, "choices": ordered, "answer": ordered.index(right)})
    return docs


def dataset(**_metadata):
    """The task's data set (lm-eval's ``custom_dataset`` hook; it passes the task's and the model's metadata,
    which the facts do not depend on)."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(documents())})
