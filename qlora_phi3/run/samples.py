"""Sample answers during training (``train.sample_prompts``): loss alone does not show whether a chat model got
better, so at every evaluation the model answers a few prompts greedily, with Phi-3's chat template and stops.

The answers are shown in the terminal (first line of each), appended to ``<run>/samples.jsonl`` (one line per
prompt per evaluation: step, prompt, answer, the reference answer when the prompt came from the eval split)
and sent to the trackers as text. ``train.sample_max_new_tokens`` bounds their time. The generation itself
(:func:`qlora_phi3.model.generate.greedy_answer`) is the one ``qlora-phi3 chat`` uses too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape
from transformers import TrainerCallback

from qlora_phi3.config import Recipe
from qlora_phi3.data.read import ChatRecord
from qlora_phi3.errors import UserError
from qlora_phi3.files import atomic_write_text
from qlora_phi3.model.generate import greedy_answer
from qlora_phi3.run.tracking import log_text
from qlora_phi3.ranks import is_main_process
from qlora_phi3.ui import info

__all__ = ["SAMPLES_FILE", "SampleAnswers", "SamplePrompt", "sample_prompts"]

SAMPLES_FILE = "samples.jsonl"
_SHOWN_CHARS = 100  # of each answer's first line in the terminal


@dataclass
class SamplePrompt:
    messages: list[dict]  # the conversation up to the answer to generate
    origin: str  # file:line, or the eval record's origin
    reference: str | None = None  # the eval split's own answer


def _from_record(record: ChatRecord) -> SamplePrompt | None:
    last = max((i for i, m in enumerate(record.messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    return SamplePrompt(record.messages[:last], record.origin, record.messages[last]["content"])


def _read_file(path: Path) -> list[SamplePrompt]:
    where = f"train.sample_prompts={path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file; give a .txt (one prompt per line) or .jsonl file, or a number of "
                        "eval prompts (e.g. train.sample_prompts=3).")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        origin = f"{path}:{n}"
        if path.suffix != ".jsonl":
            prompts.append(SamplePrompt([{"role": "user", "content": line.strip()}], origin))
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UserError(f"{origin}: not JSON ({e}); a line is {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}.") \
                from None
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
            prompts.append(SamplePrompt([{"role": "user", "content": rec["prompt"]}], origin))
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list) and rec["messages"]:
            msgs = rec["messages"]
            if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                       and isinstance(m.get("content"), str) for m in msgs):
                raise UserError(f"{origin}: each message needs a role (system, user, assistant) and a string content.")
            reference = msgs.pop()["content"] if msgs[-1]["role"] == "assistant" else None
            if not msgs or msgs[-1]["role"] != "user":
                raise UserError(f"{origin}: the messages must end with a user turn (an assistant turn after it is "
                                "read as the reference answer).")
            prompts.append(SamplePrompt(msgs, origin, reference))
        else:
            raise UserError(f"{origin}: a line is {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}, got {line[:80]!r}.")
    if not prompts:
        raise UserError(f"{where}: the file holds no prompt.")
    return prompts


def sample_prompts(recipe: Recipe, eval_records: list[ChatRecord]) -> list[SamplePrompt]:
    """The prompts to answer at each evaluation (none when off); read before the model loads."""
    spec = recipe.train.sample_prompts
    if isinstance(spec, int):
        prompts = [p for p in map(_from_record, eval_records) if p is not None]
        return prompts[:spec]
    return _read_file(Path(spec).expanduser())


class SampleAnswers(TrainerCallback):
    """At each evaluation (once per step: the final one repeats the last in-loop one), answer every prompt."""

    def __init__(self, trainer, prompts: list[SamplePrompt], recipe: Recipe, out: Path, resumed_at: int | None):
        self.trainer, self.prompts, self.recipe, self.out = trainer, prompts, recipe, out
        self.path = out / SAMPLES_FILE
        self.done: set[int] = set()
        self.seconds = 0.0  # spent answering, for run.json (what the samples cost the run)
        if resumed_at is not None:
            self._keep_until(resumed_at)

    def _keep_until(self, step: int) -> None:
        """On resume: drop the answers the interrupted run wrote after its checkpoint (they are redone)."""
        if not self.path.is_file() or not is_main_process():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step in self.done or not is_main_process():
            return
        self.done.add(step)
        t0 = time.perf_counter()
        model = model if model is not None else self.trainer.model
        was_training = model.training
        model.eval()
        rows = []
        threads = torch.get_num_threads()
        on_cpu = next(model.parameters()).device.type == "cpu"
        if on_cpu:
            # Decoding one token is a chain of tiny ops: a second thread buys nothing and, when the other core is
            # busy, each op waits for it (measured on a shared 2-core box: 32 tokens of the tiny model in 6.5 s with
            # 2 threads, 0.33 s with 1).
            torch.set_num_threads(1)
        try:
            # The training forward runs under the accelerator's autocast: answer with the same numerics.
            with self.trainer.accelerator.autocast():
                for p in self.prompts:
                    answer, ended = greedy_answer(model, self.trainer.processing_class, p.messages,
                                                  self.recipe.train.sample_max_new_tokens)
                    rows.append({"step": step, "prompt": p.messages[-1]["content"], "answer": answer,
                                 "ended": ended, "reference": p.reference, "origin": p.origin,
                                 "messages": p.messages})
        finally:
            model.train(was_training)
            torch.set_num_threads(threads)
        with self.path.open("a", encoding="utf-8") as f:  # one write per evaluation, so a kill cuts at most that
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        info(f"samples at step {step} (greedy, up to {self.recipe.train.sample_max_new_tokens} tokens; all in "
             f"{self.path}):")
        for n, r in enumerate(rows, 1):
            first = (r["answer"].splitlines() or [""])[0]
            cut = "..." if len(first) > _SHOWN_CHARS or "\n" in r["answer"] else ""
            info(f"  [{n}] {escape(repr(r['prompt'][:60]))} -> [green]{escape(first[:_SHOWN_CHARS])}{cut}[/]")
        text = "\n\n".join(f"**{r['prompt']}**\n\n{r['answer']}" + (f"\n\n*reference:* {r['reference']}"
                                                                   if r["reference"] else "") for r in rows)
        log_text(self.recipe, self.out, "samples", text, step)
        self.seconds += time.perf_counter() - t0
