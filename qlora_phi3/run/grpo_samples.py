"""GRPO's sampled completions with their rewards in ``<run>/samples.jsonl``, at every logged training step.

TRL keeps the latest generation round (prompts, completions, each reward function's score, advantages) on the
trainer; one group of it (one prompt's ``train.num_generations`` completions) per log line is appended, so a
reader sees what the rewards were given, next to the sample answers of :mod:`qlora_phi3.run.samples` (same file,
same ``step`` field, so a resumed run drops the lines written after its checkpoint in the same way).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from qlora_phi3.ranks import is_main_process
from qlora_phi3.run.samples import SAMPLES_FILE

__all__ = ["CompletionSamples", "latest_group"]


def _text(value) -> str | list:
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[-1].get("content", "") if len(value) == 1 else value
    return value


def latest_group(logs: dict, group: int, step: int) -> list[dict]:
    """Rows for the first prompt's completions of the trainer's latest generation round (``trainer._logs``)."""
    prompts, completions = list(logs["prompt"]), list(logs["completion"])
    rewards = {name: list(values) for name, values in logs["rewards"].items()}
    advantages = list(logs["advantages"])
    rows = []
    for i in range(min(group, len(completions))):
        scores = {name: (None if values[i] != values[i] else values[i]) for name, values in rewards.items()}
        rows.append({"step": step, "kind": "grpo_completion", "prompt": _text(prompts[i]),
                     "completion": _text(completions[i]), "rewards": scores,
                     "advantage": advantages[i] if i < len(advantages) else None})
    return rows


class CompletionSamples(TrainerCallback):
    def __init__(self, trainer, out: Path):
        self.trainer, self.path, self.written = trainer, out / SAMPLES_FILE, set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not is_main_process() or "loss" not in (logs or {}) or state.global_step in self.written:
            return
        self.written.add(state.global_step)
        rows = latest_group(self.trainer._logs, args.num_generations, state.global_step)
        if rows:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:  # one write per log line: a kill cuts at most that
                f.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
