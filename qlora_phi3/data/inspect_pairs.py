"""``qlora-phi3 data`` for preference data: validation, prompt / answer / row lengths, what ``data.max_seq_len`` and
``data.max_prompt_len`` cut, and the loss mask of one pair (chosen and rejected), as the trainer will see them."""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.data.encode import encode_conversation, reply_markers
from qlora_phi3.data.inspect import PERCENTILES, percentile, render_sample
from qlora_phi3.data.preference import PairRecord, encode_pairs, encode_unpaired, load_preference_splits
from qlora_phi3.data.read import ChatRecord
from qlora_phi3.errors import UserError
from qlora_phi3.ui import info, warn

__all__ = ["inspect_preference"]


def _percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)
    return {f"p{p}": percentile(ordered, p) for p in PERCENTILES} if ordered else {}


def inspect_preference(recipe: Recipe, tokenizer, sample: int = 0, out_dir: str | Path | None = None) -> dict:
    """Report on ``recipe``'s preference data (``train.method`` dpo, orpo, simpo or kto); write data_report.json."""
    from qlora_phi3.files import atomic_write_json

    d, method = recipe.data, recipe.train.method
    splits = load_preference_splits(d, method, recipe.train.seed)
    report = splits.report
    records = splits.train + splits.eval
    info(f"[bold]{report.source}[/]: {report.total:,} records read as [bold]{report.format}[/] for "
         f"train.method={method}; {len(records):,} usable ({len(splits.train):,} train / {len(splits.eval):,} eval: "
         f"{splits.eval_from})")
    for note in report.notes + splits.notes:
        info(f"  note: {note}")
    if report.n_bad or report.duplicates:
        warn(f"{report.n_bad:,} bad records skipped (data.max_bad_fraction={d.max_bad_fraction}); "
             f"{len(report.duplicates):,} exact duplicates:")
        for line in report.summary_lines():
            info(f"  {line}")
    paired = method != "kto"
    # Lengths before any cut (no limit), then what the recipe's limits cut.
    uncut = (encode_pairs if paired else encode_unpaired)(records, tokenizer, 10**9)
    cut = (encode_pairs if paired else encode_unpaired)(records, tokenizer, d.max_seq_len, d.max_prompt_len)
    answers = {"chosen": uncut.chosen_ids, "rejected": uncut.rejected_ids} if paired else \
        {"completion": uncut.completion_ids}
    lengths = {"prompt": [len(p) for p in uncut.prompt_ids]}
    lengths |= {name: [len(a) for a in ids] for name, ids in answers.items()}
    lengths["row"] = [len(p) + max(len(ids[i]) for ids in answers.values()) for i, p in enumerate(uncut.prompt_ids)]
    result = {"source": report.source, "method": method, "records_read": report.total, "usable": len(records),
              "skipped": report.n_bad, "train": len(splits.train), "eval": len(splits.eval),
              "max_seq_len": d.max_seq_len, "max_prompt_len": d.max_prompt_len,
              "token_lengths": {k: _percentiles(v) for k, v in lengths.items()},
              "prompts_cut": cut.prompt_cut, "answers_cut": cut.truncated, "dropped": cut.dropped,
              "answer_tokens_lost": cut.answer_tokens_lost}
    info("tokens (percentiles " + "/".join(f"p{p}" for p in PERCENTILES) + "): " + "; ".join(
        f"{name} {'/'.join(str(v) for v in result['token_lengths'][name].values())}" for name in lengths))
    what = "pair" if paired else "record"
    line = (f"data.max_seq_len={d.max_seq_len} per row, data.max_prompt_len={d.max_prompt_len}: {cut.prompt_cut} "
            f"prompts cut (their last turns kept), {cut.truncated} {what}s with an answer cut "
            f"({cut.answer_tokens_lost:,} answer tokens lost), {cut.dropped} {what}s dropped (the prompt fills a row)")
    (warn if cut.truncated or cut.dropped else info)(line)
    if not records:
        raise UserError("no usable records to render.")
    if not 0 <= sample < len(records):
        raise UserError(f"--sample {sample}: there are {len(records)} usable records (0 to {len(records) - 1}).")
    rec, markers = records[sample], reply_markers(tokenizer)
    sides = [("chosen", rec.chosen), ("rejected", rec.rejected)] if isinstance(rec, PairRecord) else \
        [(f"completion, label {str(rec.label).lower()}", rec.completion)]
    for name, answer in sides:
        messages = rec.prompt + [{"role": "assistant", "content": answer}]
        ids, labels = encode_conversation(tokenizer, messages, markers)
        last = max(i for i, t in enumerate(labels) if t != -100)
        start = last
        while start > 0 and labels[start - 1] != -100:
            start -= 1
        # Only the last answer carries the preference loss (an earlier assistant turn is prompt here).
        labels = [t if start <= i <= last else -100 for i, t in enumerate(labels)]
        info(f"[bold]{name}[/] answer:")
        render_sample(tokenizer, ChatRecord(messages, rec.origin), ids, labels, d.max_seq_len, sample)
    out = Path(out_dir) if out_dir else Path(recipe.train.output_dir).expanduser().with_name(
        Path(recipe.train.output_dir).name + "-data")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "data_report.json", result)
    info(f"report: {out / 'data_report.json'}")
    return result
