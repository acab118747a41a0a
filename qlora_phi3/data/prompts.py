"""Prompt-only data for GRPO, in TRL's convention: a ``prompt`` column (text, or a list of ``{role, content}`` turns
ending with the user's), and any other columns, which are handed to the reward functions as keyword arguments (for
example ``answer``: ``{"prompt": [{"role": "user", "content": "What is 3 plus 4?"}], "answer": "7"}``).

Read from the same sources as chat data (:func:`qlora_phi3.data.read.read_rows`: JSONL, JSON, Parquet, gzip,
``save_to_disk`` directories, Hub ids), validated record by record with ``file:line`` under the same bad-record
policy (``data.strict``, ``data.max_bad_fraction``): no prompt, an empty prompt, malformed turns, and (once the
tokenizer is known, :func:`drop_long_prompts`) a prompt over the limit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from qlora_phi3.config import DataConfig
from qlora_phi3.data.formats import RecordProblem
from qlora_phi3.data.holdout import split_records
from qlora_phi3.data.read import LoadReport, apply_bad_record_policy, read_rows, resolve_data_path, turn_problem
from qlora_phi3.errors import UserError

__all__ = ["PromptRecord", "answer_chats", "drop_long_prompts", "load_prompt_records", "load_prompt_splits",
           "prompt_limit", "prompt_token_ids"]

PROMPT_EXAMPLE = '{"prompt": [{"role": "user", "content": "What is 3 plus 4?"}], "answer": "7"}'


@dataclass
class PromptRecord:
    prompt: list[dict] | str  # turns ending with the user's, or plain text (no chat template)
    columns: dict  # every other field: the reward functions' keyword arguments
    origin: str  # file:line

    @property
    def messages(self) -> list[dict]:
        return self.prompt if isinstance(self.prompt, list) else [{"role": "user", "content": self.prompt}]


def answer_chats(records: list[PromptRecord], column: str) -> list:
    """Prompt records as chats, each prompt with its ``column`` (``train.answer_column``) as the reply: what a GRPO
    run's sample answers show as the reference, and what merge's report and export's check score models on."""
    from qlora_phi3.data.read import ChatRecord

    return [ChatRecord(r.messages + [{"role": "assistant", "content": str(r.columns.get(column, ""))}], r.origin)
            for r in records]


def _prompt(row) -> tuple[list[dict] | str, dict]:
    if not isinstance(row, dict):
        raise RecordProblem("not a JSON object", f"got a JSON {type(row).__name__}")
    if row.get("prompt") is None:
        raise RecordProblem("no 'prompt' field", f"fields {sorted(row)[:8]}; GRPO reads a 'prompt' (text or turns)")
    prompt, columns = row["prompt"], {k: v for k, v in row.items() if k != "prompt"}
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordProblem("empty prompt", "the 'prompt' text is empty")
        return prompt, columns
    if isinstance(prompt, dict) and "role" in prompt:
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RecordProblem("empty prompt" if prompt == [] else "bad 'prompt'",
                            "give the prompt as text or a non-empty list of {role, content} turns")
    # The model answers next: checked as the conversation it starts (turns valid, last one the user's).
    problem = turn_problem(prompt + [{"role": "assistant", "content": "-"}])
    if problem is not None:
        raise RecordProblem(problem.reason, f"prompt: {problem.detail}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt], columns


def _digest(record: PromptRecord) -> bytes:
    text = json.dumps([record.prompt, record.columns], ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _skip(cfg: DataConfig, report: LoadReport, problem: RecordProblem, origin: str) -> None:
    if cfg.strict:
        raise UserError(f"{origin}: {problem}. data.strict is true, so the first bad record stops the load; fix the "
                        "record, or set data.strict=false to skip bad records.")
    report.skip(problem.reason, origin, problem.detail)


def load_prompt_records(cfg: DataConfig, split: str | None = None) -> tuple[list[PromptRecord], LoadReport]:
    """Valid prompt records of ``split`` (default ``cfg.split``), and a LoadReport of what was skipped and why."""
    path = resolve_data_path(cfg.path)
    report = LoadReport(source=path, duplicates_dropped=cfg.drop_duplicates, format="prompts")

    def columns(names):
        if "prompt" not in names:
            raise UserError(f"{path}: columns {names} have no 'prompt'; train.method=grpo reads prompts, e.g. "
                            f"{PROMPT_EXAMPLE}")
        return list(names)

    records, first_seen = [], {}
    for row, origin, problem in read_rows(cfg, split or cfg.split, report, columns):
        report.total += 1
        if problem is None:
            try:
                record = PromptRecord(*_prompt(row), origin)
            except RecordProblem as p:
                problem = p
        if problem is not None:
            _skip(cfg, report, problem, origin)
            continue
        digest = _digest(record)
        if digest in first_seen:
            report.duplicates.append((origin, first_seen[digest]))
            if cfg.drop_duplicates:
                continue
        else:
            first_seen[digest] = origin
        records.append(record)
    apply_bad_record_policy(cfg, report, records, "prompts", f"train.method=grpo expects e.g. {PROMPT_EXAMPLE}")
    return records, report


def prompt_token_ids(tokenizer, record: PromptRecord) -> list[int]:
    """The prompt's tokens as TRL's GRPOTrainer builds them: turns through the chat template with the generation
    prompt; text as it is."""
    if isinstance(record.prompt, str):
        return tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
    out = tokenizer.apply_chat_template(record.prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def prompt_limit(cfg: DataConfig, max_completion_len: int) -> int:
    """Prompt tokens allowed: data.max_prompt_len, else what data.max_seq_len leaves beside the completion."""
    return cfg.max_prompt_len or cfg.max_seq_len - max_completion_len


def drop_long_prompts(cfg: DataConfig, report: LoadReport, records: list[PromptRecord], tokenizer,
                      limit: int) -> tuple[list[PromptRecord], list[int]]:
    """``records`` whose prompt fits ``limit`` tokens, and their lengths; the others are bad records ("prompt over
    the limit", with file:line) under the bad-record policy. A prompt is never cut: its end is the question."""
    kept, lengths = [], []
    for record in records:
        n = len(prompt_token_ids(tokenizer, record))
        if n > limit:
            _skip(cfg, report, RecordProblem("prompt over the limit", f"{n} tokens > {limit} (data.max_prompt_len, "
                                             "or data.max_seq_len - train.max_completion_len)"), record.origin)
            continue
        kept.append(record)
        lengths.append(n)
    apply_bad_record_policy(cfg, report, kept, "prompts", "Shorten the prompts or raise data.max_seq_len.")
    return kept, lengths


def eval_from(splits, held: list) -> str:
    """Where the held-out prompts come from, and how many of them :func:`drop_long_prompts` dropped since, so that
    "4 eval" beside "5 held out" reads as what happened."""
    dropped = len(splits.eval) - len(held)
    return splits.eval_from + (f"; {dropped} of them over the prompt limit" if dropped else "")


def load_prompt_splits(cfg: DataConfig, seed: int, records: tuple[list, LoadReport] | None = None):
    """Train and held-out prompts by the chat splits' rules (:func:`qlora_phi3.data.holdout.split_records`): a named
    eval split where the source has one, else a seeded ``data.eval_fraction``; a prompt never on both sides.
    ``records``: the training split's prompts and report, already read (:func:`load_prompt_records`)."""
    records, report = records or load_prompt_records(cfg)
    return split_records(cfg, seed, records, report, lambda split: load_prompt_records(cfg, split)[0],
                         key=lambda r: json.dumps(r.prompt, ensure_ascii=False), noun="prompt",
                         measured="the held-out reward")
