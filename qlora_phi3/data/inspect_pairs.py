"""``qlora-phi3 data`` for preference data: validation, prompt / answer / row lengths, what ``data.max_seq_len`` and
``data.max_prompt_len`` cut, and the labels of one pair (chosen and rejected), as the trainer will see them. It
returns them as a :class:`PairInspection`, which ``cli/render_data.py`` shows."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.data.encode import encode_conversation, reply_markers
from qlora_phi3.data.inspect import PERCENTILES, SampleTokens, percentile, sample_tokens
from qlora_phi3.data.preference import PairRecord, encode_pairs, encode_unpaired, load_preference_splits
from qlora_phi3.data.read import ChatRecord, LoadReport
from qlora_phi3.errors import UserError
from qlora_phi3.methods import METHODS

__all__ = ["PairInspection", "inspect_preference"]


@dataclass
class PairInspection:
    source: str
    method: str
    records_read: int
    usable: int
    skipped: int  # bad records
    train: int
    eval: int
    max_seq_len: int
    max_prompt_len: int | None
    token_lengths: dict[str, dict[str, int]]  # prompt, chosen and rejected (or completion), row -> percentiles
    prompts_cut: int
    answers_cut: int
    dropped: int
    answer_tokens_lost: int
    paired: bool  # chosen and rejected; False: one labelled answer (kto)
    eval_from: str  # where the eval records came from, in words
    notes: list[str]  # the reader's and the split's
    read: LoadReport = field(repr=False)  # skipped records (file:line)
    samples: dict[str, SampleTokens] = field(repr=False)  # the --sample record's answers, by name
    json_path: str = ""


# What data_report.json holds: the numbers, not what they were computed from.
_NOT_IN_JSON = ("paired", "eval_from", "notes", "read", "samples", "json_path")


def _percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)
    return {f"p{p}": percentile(ordered, p) for p in PERCENTILES} if ordered else {}


def inspect_preference(recipe: Recipe, tokenizer, sample: int = 0,
                       out_dir: str | Path | None = None) -> PairInspection:
    """Measure ``recipe``'s preference data (a ``train.method`` that reads pairs or labelled answers), with record number
    ``sample``'s answers token by token; write data_report.json."""
    from qlora_phi3.files import atomic_write_json

    d, method = recipe.data, recipe.train.method
    splits = load_preference_splits(d, method, recipe.train.seed)
    report = splits.report
    records = splits.train + splits.eval
    paired = METHODS[method].data == "pairs"
    # Lengths before any cut (no limit), then what the recipe's limits cut.
    uncut = (encode_pairs if paired else encode_unpaired)(records, tokenizer, 10**9)
    cut = (encode_pairs if paired else encode_unpaired)(records, tokenizer, d.max_seq_len, d.max_prompt_len)
    answers = {"chosen": uncut.chosen_ids, "rejected": uncut.rejected_ids} if paired else \
        {"completion": uncut.completion_ids}
    lengths = {"prompt": [len(p) for p in uncut.prompt_ids]}
    lengths |= {name: [len(a) for a in ids] for name, ids in answers.items()}
    lengths["row"] = [len(p) + max(len(ids[i]) for ids in answers.values()) for i, p in enumerate(uncut.prompt_ids)]
    if not records:
        raise UserError("no usable records to render.")
    if not 0 <= sample < len(records):
        raise UserError(f"--sample {sample}: there are {len(records)} usable records (0 to {len(records) - 1}).")
    rec, markers = records[sample], reply_markers(tokenizer)
    sides = [("chosen", rec.chosen), ("rejected", rec.rejected)] if isinstance(rec, PairRecord) else \
        [(f"completion, label {str(rec.label).lower()}", rec.completion)]
    samples = {}
    for name, answer in sides:
        messages = rec.prompt + [{"role": "assistant", "content": answer}]
        ids, labels = encode_conversation(tokenizer, messages, markers)
        last = max(i for i, t in enumerate(labels) if t != -100)
        start = last
        while start > 0 and labels[start - 1] != -100:
            start -= 1
        # Only the last answer carries the preference loss (an earlier assistant turn is prompt here).
        labels = [t if start <= i <= last else -100 for i, t in enumerate(labels)]
        samples[name] = sample_tokens(tokenizer, ChatRecord(messages, rec.origin), ids, labels, sample)
    res = PairInspection(
        source=report.source, method=method, records_read=report.total, usable=len(records), skipped=report.n_bad,
        train=len(splits.train), eval=len(splits.eval), max_seq_len=d.max_seq_len, max_prompt_len=d.max_prompt_len,
        token_lengths={k: _percentiles(v) for k, v in lengths.items()}, prompts_cut=cut.prompt_cut,
        answers_cut=cut.truncated, dropped=cut.dropped, answer_tokens_lost=cut.answer_tokens_lost, paired=paired,
        eval_from=splits.eval_from, notes=report.notes + splits.notes, read=report, samples=samples)
    out = Path(out_dir) if out_dir else Path(recipe.train.output_dir).expanduser().with_name(
        Path(recipe.train.output_dir).name + "-data")
    out.mkdir(parents=True, exist_ok=True)
    res.json_path = str(out / "data_report.json")
    atomic_write_json(Path(res.json_path), {f.name: getattr(res, f.name) for f in fields(res)
                                            if f.name not in _NOT_IN_JSON})
    return res
