"""Preference data: pairs of a better and a worse answer (dpo, orpo, simpo) or answers labelled good or bad (kto).

Read from the same sources as chat data (:func:`qlora_phi3.data.read.read_rows`: JSONL, JSON, Parquet, gzip,
``save_to_disk`` directories, Hub ids with split and revision), validated record by record with ``file:line``,
and encoded with Phi-3's own chat template exactly as SFT encodes (:mod:`qlora_phi3.data.encode`), so the answer
tokens that carry the preference loss are the ones SFT would train on: the reply and its closing ``<|end|>``.

| kind     | fields                                                                                |
|----------|---------------------------------------------------------------------------------------|
| pairs    | ``prompt`` (turns, or a string), ``chosen`` and ``rejected`` (assistant turn(s), or strings): TRL's format |
| pairs    | ``chosen`` and ``rejected`` only: whole conversations sharing every turn but the last (UltraFeedback, HH-RLHF) |
| unpaired | ``prompt``, ``completion`` (turns or strings) and a boolean ``label`` (KTO)            |

Bad records are skipped and counted with the same policy as chat data (``data.strict``,
``data.max_bad_fraction``); data of the wrong kind for ``train.method`` fails at once, with the fix.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from qlora_phi3.config import DataConfig
from qlora_phi3.data.encode import encode_conversation, reply_markers
from qlora_phi3.data.formats import RecordProblem
from qlora_phi3.data.holdout import Splits, split_records
from qlora_phi3.data.read import (ChatRecord, LoadReport, apply_bad_record_policy, digest, read_rows, resolve_data_path,
                                  seen_before, turn_problem)
from qlora_phi3.errors import UserError
from qlora_phi3.methods import METHODS, methods_reading

__all__ = ["EncodedPairs", "EncodedUnpaired", "PairRecord", "UnpairedRecord", "encode_pairs", "encode_unpaired",
           "eval_chats", "load_preference_records", "load_preference_splits", "record_kind"]

_PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_UNPAIRED_COLUMNS = ("prompt", "completion", "label")
_PAIR_EXAMPLE = ('{"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}], '
                 '"rejected": [{"role": "assistant", "content": ...}]}')
_UNPAIRED_EXAMPLE = ('{"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": '
                     '...}], "label": true}')


@dataclass
class PairRecord:
    prompt: list[dict]  # the conversation up to the answer (ends with a user turn)
    chosen: str
    rejected: str
    origin: str

    @property
    def messages(self) -> list[dict]:
        """The prompt answered by the chosen reply: what sample answers and the eval overlap check look at."""
        return self.prompt + [{"role": "assistant", "content": self.chosen}]


@dataclass
class UnpairedRecord:
    prompt: list[dict]
    completion: str
    label: bool  # desirable
    origin: str

    @property
    def messages(self) -> list[dict]:
        return self.prompt + [{"role": "assistant", "content": self.completion}]


def record_kind(keys) -> str | None:
    """"pairs", "unpaired" or None, from a record's (or a dataset's) field names."""
    keys = set(keys)
    if {"chosen", "rejected"} <= keys:
        return "pairs"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    return None


def _turns(value, key: str, role: str) -> list:
    """A side of a record as turns: a string is one turn of ``role``; a list is already turns."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and "role" in value:  # a single message, not wrapped in a list
        return [value]
    if not isinstance(value, list):
        raise RecordProblem(f"bad '{key}'", f"'{key}' is {type(value).__name__}; give a string or a list of "
                                            "{role, content} turns")
    return value


def _checked(messages: list, what: str) -> list[dict]:
    """``messages`` validated as a chat whose last turn is the assistant's non-empty answer."""
    problem = turn_problem(messages)
    if problem is not None:
        if problem.reason == "empty content" and messages and messages[-1] is not None and isinstance(
                messages[-1], dict) and not str(messages[-1].get("content") or "").strip():
            raise RecordProblem("empty answer", f"the {what} answer is empty; drop the record or write the answer")
        raise RecordProblem(problem.reason, f"{what}: {problem.detail}")
    out = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
            "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in m["content"])} for m in messages]
    if out[-1]["role"] != "assistant":
        raise RecordProblem("last turn not the assistant's", f"the {what} conversation ends with a "
                            f"{out[-1]['role']} turn; its last turn must be the assistant's answer")
    return out


def _pair(row: dict) -> tuple[list[dict], str, str]:
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise RecordProblem(f"no '{key}' field", f"fields {sorted(row)[:8]}; a pair needs 'chosen' and 'rejected'")
    prompt = _turns(row["prompt"], "prompt", "user") if row.get("prompt") is not None else []
    chosen_turns = _turns(row["chosen"], "chosen", "assistant")
    if isinstance(row.get("prompt"), str) and isinstance(row["chosen"], list) and len(chosen_turns) > 1:
        # UltraFeedback-binarized: a string "prompt" beside chosen / rejected conversations that already hold it
        # (TRL's maybe_extract_prompt reads it the same way): the conversations carry the prompt.
        prompt = []
    chosen = _checked(prompt + chosen_turns, "chosen")
    rejected = _checked(prompt + _turns(row["rejected"], "rejected", "assistant"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise RecordProblem("prompts differ", f"chosen and rejected differ before their last turn (first at turn {at}); "
                            "a pair answers one prompt: only the last (assistant) turn may differ")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise RecordProblem("chosen identical to rejected", "both answers are the same text, so the pair teaches "
                            "nothing; drop it")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _unpaired(row: dict) -> tuple[list[dict], str, bool]:
    label = row.get("label")
    if not isinstance(label, bool):
        raise RecordProblem("label not a boolean", f"'label' is {label!r}; write true (a desirable answer) or false "
                            "(an undesirable one)")
    if row.get("completion") is None:
        raise RecordProblem("no 'completion' field", "a KTO record needs 'prompt', 'completion' and 'label'")
    prompt = _turns(row["prompt"], "prompt", "user") if row.get("prompt") is not None else []
    full = _checked(prompt + _turns(row["completion"], "completion", "assistant"), "completion")
    return full[:-1], full[-1]["content"], label


def _methods_for(kind: str) -> str:
    """'dpo (or orpo, simpo)': the methods that read ``kind``, from the methods table."""
    first, *others = methods_reading(kind)
    return f"{first} (or {', '.join(others)})" if others else first


def _wrong_kind(kind: str, method: str, source: str, origin: str) -> UserError:
    if kind == "pairs":
        return UserError(f"{origin}: {source} holds preference pairs (chosen / rejected), but train.method={method} "
                         f"trains on unpaired answers labelled good or bad. Use train.method={_methods_for('pairs')} "
                         "for pairs, or write each answer as its own record: " + _UNPAIRED_EXAMPLE)
    if kind == "unpaired":
        return UserError(f"{origin}: {source} holds unpaired answers (prompt / completion / label), but "
                         f"train.method={method} needs pairs of a better and a worse answer to the same prompt. Use "
                         f"train.method={_methods_for('unpaired')} for labelled answers, or write pairs: "
                         + _PAIR_EXAMPLE)
    return UserError(f"{origin}: {source} holds chat records, not preference data; train.method={method} needs "
                     + (f"pairs: {_PAIR_EXAMPLE}" if METHODS[method].data == "pairs" else f"labelled answers: "
                        f"{_UNPAIRED_EXAMPLE}") + f". For chats use train.method={_methods_for('chat')}.")


def load_preference_records(cfg: DataConfig, method: str, split: str | None = None):
    """Valid preference records of ``split`` (default ``cfg.split``) for ``method``, and a LoadReport."""
    path = resolve_data_path(cfg.path)
    want = METHODS[method].data
    report = LoadReport(source=path, duplicates_dropped=cfg.drop_duplicates,
                        format="preference pairs" if want == "pairs" else f"unpaired ({_methods_for(want)})")

    def columns(names):
        kind = record_kind(names)
        if kind != want:
            raise _wrong_kind(kind or "chat", method, path, f"{path} (columns {names})")
        return [c for c in names if c in (_PAIR_COLUMNS if want == "pairs" else _UNPAIRED_COLUMNS)]

    records, first_seen = [], {}
    for row, origin, problem in read_rows(cfg, split or cfg.split, report, columns):
        report.total += 1
        record = None
        if problem is None:
            if not isinstance(row, dict):
                problem = RecordProblem("not a JSON object", f"got a JSON {type(row).__name__}")
            else:
                kind = record_kind(k for k, v in row.items() if v is not None or k == "label")
                if kind is None and want == "pairs" and ("chosen" in row) != ("rejected" in row):
                    kind = "pairs"  # a pair missing one side: a bad record, reported as such below
                if kind is not None and kind != want:
                    raise _wrong_kind(kind, method, path, origin)
                if kind is None and not records and report.n_bad == 0 and ("messages" in row or "conversations" in row):
                    raise _wrong_kind("chat", method, path, origin)
                try:
                    if want == "pairs":
                        prompt, chosen, rejected = _pair(row)
                        record = PairRecord(prompt, chosen, rejected, origin)
                    else:
                        prompt, completion, label = _unpaired(row)
                        record = UnpairedRecord(prompt, completion, label, origin)
                except RecordProblem as p:
                    problem = p
        if problem is not None:
            if cfg.strict:
                raise UserError(f"{origin}: {problem}. data.strict is true, so the first bad record stops the load; "
                                "fix the record, or set data.strict=false to skip bad records.")
            report.skip(problem.reason, origin, problem.detail)
            continue
        extra = (record.rejected if want == "pairs" else str(record.label))
        if seen_before(report, first_seen, digest(record.messages, extra), origin) and cfg.drop_duplicates:
            continue
        records.append(record)
    apply_bad_record_policy(cfg, report, records, "preference records", f"train.method={method} expects e.g. "
                            f"{_PAIR_EXAMPLE if want == 'pairs' else _UNPAIRED_EXAMPLE}")
    if want == "unpaired" and len({r.label for r in records}) < 2:
        only = records[0].label
        raise UserError(f"{report.source}: every KTO record has label {str(only).lower()}; KTO needs desirable (true) "
                        "and undesirable (false) answers both.")
    return records, report


def eval_chats(records: list) -> list[ChatRecord]:
    """Held-out preference records as chats, their prompt with the chosen (or desirable) answer, for sample
    answers."""
    return [ChatRecord(r.messages, r.origin) for r in records if isinstance(r, PairRecord) or r.label]


def load_preference_splits(cfg: DataConfig, method: str, seed: int,
                           records: tuple[list, LoadReport] | None = None) -> Splits:
    """Train and held-out preference records, by the chat splits' rule (:mod:`qlora_phi3.data.holdout`): a named
    eval split where the source has one, else a seeded ``data.eval_fraction``; a prompt never in both.
    ``records``: the training split's records and report, already read (:func:`load_preference_records`)."""
    records, report = records or load_preference_records(cfg, method)
    return split_records(cfg, seed, records, report, lambda name: load_preference_records(cfg, method, name)[0],
                         key=lambda r: digest(r.prompt), noun="prompt", measured="the held-out reward accuracy")


# ---- encoding ----

def _prompt_and_answer(tokenizer, prompt: list[dict], answer: str, markers) -> tuple[list[int], list[int]]:
    """(prompt ids up to and including the generation prompt, answer ids up to and including its ``<|end|>``),
    cut from one rendering of the whole conversation: exactly the tokens and the loss span SFT would use."""
    ids, labels = encode_conversation(tokenizer, prompt + [{"role": "assistant", "content": answer}], markers)
    stop = max(i for i, t in enumerate(labels) if t != -100)  # the last reply's <|end|>
    start = stop
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return ids[:start], ids[start:stop + 1]


@dataclass
class _Cuts:
    truncated: int = 0  # records whose answer(s) were cut to fit data.max_seq_len
    prompt_cut: int = 0  # prompts cut to data.max_prompt_len
    dropped: int = 0  # prompts that fill data.max_seq_len by themselves: no answer token left
    answer_tokens_lost: int = 0


def _fit(prompt: list[int], answers: list[list[int]], max_seq_len: int, max_prompt_len: int | None, cuts: _Cuts):
    if max_prompt_len and len(prompt) > max_prompt_len:
        prompt = prompt[-max_prompt_len:]  # keep the latest turns and the generation prompt
        cuts.prompt_cut += 1
    room = max_seq_len - len(prompt)
    if room <= 0:
        cuts.dropped += 1
        return None
    if any(len(a) > room for a in answers):
        cuts.truncated += 1
        cuts.answer_tokens_lost += sum(max(0, len(a) - room) for a in answers)
    return prompt, [a[:room] for a in answers]


@dataclass
class _EncodedRows:
    """Encoded preference records: their columns (``_COLUMNS``: our field -> the trainer's column) and what
    truncation cut."""
    prompt_ids: list[list[int]]
    origins: list[str]
    truncated: int = 0
    prompt_cut: int = 0
    dropped: int = 0
    answer_tokens_lost: int = 0
    _COLUMNS = {}

    @property
    def n_rows(self) -> int:
        return len(self.prompt_ids)

    def _rows(self):
        return zip(*(getattr(self, ours) for ours in self._COLUMNS))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for row in self._rows():
            h.update(repr(row).encode())
        return h.hexdigest()[:16]

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({theirs: getattr(self, ours) for ours, theirs in self._COLUMNS.items()})


@dataclass(kw_only=True)
class EncodedPairs(_EncodedRows):
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    _COLUMNS = {"prompt_ids": "prompt_ids", "chosen_ids": "chosen_ids", "rejected_ids": "rejected_ids"}

    @property
    def n_tokens(self) -> int:
        """Tokens in the two rows of every pair (prompt + chosen, prompt + rejected): what a step computes."""
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in self._rows())

    @property
    def n_label_tokens(self) -> int:
        return sum(len(c) + len(r) for c, r in zip(self.chosen_ids, self.rejected_ids))


@dataclass(kw_only=True)
class EncodedUnpaired(_EncodedRows):
    completion_ids: list[list[int]]
    labels: list[bool]
    _COLUMNS = {"prompt_ids": "prompt_ids", "completion_ids": "completion_ids", "labels": "label"}

    @property
    def n_tokens(self) -> int:
        return sum(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids))

    @property
    def n_label_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def encode_pairs(records: list[PairRecord], tokenizer, max_seq_len: int, max_prompt_len: int | None = None) -> EncodedPairs:
    """Token ids of every pair: the shared prompt (generation prompt included) and each answer with its ``<|end|>``;
    cut so that prompt + answer fits ``max_seq_len`` (counted, never silently)."""
    out, cuts, markers = EncodedPairs([], [], chosen_ids=[], rejected_ids=[]), _Cuts(), reply_markers(tokenizer)
    for rec in records:
        try:
            prompt, chosen = _prompt_and_answer(tokenizer, rec.prompt, rec.chosen, markers)
            prompt_r, rejected = _prompt_and_answer(tokenizer, rec.prompt, rec.rejected, markers)
        except UserError as e:
            raise UserError(f"{rec.origin}: {e}") from None
        if prompt != prompt_r:  # cannot happen with Phi-3's template (the answer starts after <|assistant|>)
            raise UserError(f"{rec.origin}: the prompt tokenizes differently before the chosen and the rejected "
                            "answer; is this Phi-3's tokenizer and chat template?")
        fitted = _fit(prompt, [chosen, rejected], max_seq_len, max_prompt_len, cuts)
        if fitted is None:
            continue
        prompt, (chosen, rejected) = fitted
        out.prompt_ids.append(prompt)
        out.chosen_ids.append(chosen)
        out.rejected_ids.append(rejected)
        out.origins.append(rec.origin)
    out.truncated, out.prompt_cut, out.dropped, out.answer_tokens_lost = (cuts.truncated, cuts.prompt_cut, cuts.dropped,
                                                                         cuts.answer_tokens_lost)
    return out


def encode_unpaired(records: list[UnpairedRecord], tokenizer, max_seq_len: int,
                    max_prompt_len: int | None = None) -> EncodedUnpaired:
    out, cuts, markers = EncodedUnpaired([], [], completion_ids=[], labels=[]), _Cuts(), reply_markers(tokenizer)
    for rec in records:
        try:
            prompt, completion = _prompt_and_answer(tokenizer, rec.prompt, rec.completion, markers)
        except UserError as e:
            raise UserError(f"{rec.origin}: {e}") from None
        fitted = _fit(prompt, [completion], max_seq_len, max_prompt_len, cuts)
        if fitted is None:
            continue
        prompt, (completion,) = fitted
        out.prompt_ids.append(prompt)
        out.completion_ids.append(completion)
        out.labels.append(rec.label)
        out.origins.append(rec.origin)
    out.truncated, out.prompt_cut, out.dropped, out.answer_tokens_lost = (cuts.truncated, cuts.prompt_cut, cuts.dropped,
                                                                         cuts.answer_tokens_lost)
    return out


def shuffled_for_kto(enc: EncodedUnpaired, seed: int) -> EncodedUnpaired:
    """A seeded shuffle: KTO trains in file order (its KL term pairs each answer with its micro-batch neighbours'),
    so files sorted by label would give one-label batches."""
    order = list(range(enc.n_rows))
    random.Random(seed).shuffle(order)
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    return EncodedUnpaired(pick(enc.prompt_ids), pick(enc.origins), enc.truncated, enc.prompt_cut, enc.dropped,
                           enc.answer_tokens_lost, completion_ids=pick(enc.completion_ids), labels=pick(enc.labels))
