"""``qlora-phi3 data`` for prompt data (grpo): validation, prompt token lengths against the limit, and the columns
the reward functions will receive, with one prompt as the model will see it. Returned as a
:class:`PromptInspection`, which ``cli/render_data.py`` shows; the numbers also go to data_report.json."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.data.inspect import PERCENTILES, percentile
from qlora_phi3.data.prompts import drop_long_prompts, eval_from, load_prompt_splits, prompt_limit, prompt_token_ids
from qlora_phi3.data.read import LoadReport
from qlora_phi3.errors import UserError

__all__ = ["PromptInspection", "inspect_prompts"]


@dataclass
class PromptInspection:
    source: str
    records_read: int
    usable: int  # within the prompt limit
    skipped: int  # bad records, over-limit prompts included
    train: int
    eval: int
    prompt_limit: int  # tokens: data.max_prompt_len, or data.max_seq_len - train.max_completion_len
    max_completion_len: int
    num_generations: int
    token_lengths: dict[str, int]  # prompt tokens: percentiles
    reward_columns: list[str]  # every column besides prompt, handed to the rewards as keyword arguments
    rewards: list[str]
    eval_from: str
    notes: list[str]
    read: LoadReport = field(repr=False)
    sample_text: str = field(default="", repr=False)  # the --sample prompt, rendered as the model sees it
    sample_columns: dict = field(default_factory=dict, repr=False)
    json_path: str = ""


_NOT_IN_JSON = ("eval_from", "notes", "read", "sample_text", "sample_columns", "json_path")


def inspect_prompts(recipe: Recipe, tokenizer, sample: int = 0, out_dir: str | Path | None = None) -> PromptInspection:
    """Measure ``recipe``'s prompts with prompt number ``sample`` rendered; write data_report.json."""
    from qlora_phi3.files import atomic_write_json

    d, t = recipe.data, recipe.train
    splits = load_prompt_splits(d, t.seed)
    limit = prompt_limit(d, t.max_completion_len)
    train, train_lengths = drop_long_prompts(d, splits.report, splits.train, tokenizer, limit)
    held, held_lengths = drop_long_prompts(d, splits.report, splits.eval, tokenizer, limit)
    records, lengths = train + held, sorted(train_lengths + held_lengths)
    if not 0 <= sample < len(records):
        raise UserError(f"--sample {sample}: there are {len(records)} usable prompts (0 to {len(records) - 1}).")
    columns = sorted({k for r in records for k in r.columns})
    res = PromptInspection(
        source=splits.report.source, records_read=splits.report.total, usable=len(records),
        skipped=splits.report.n_bad, train=len(train), eval=len(held), prompt_limit=limit,
        max_completion_len=t.max_completion_len, num_generations=t.num_generations,
        token_lengths={f"p{p}": percentile(lengths, p) for p in PERCENTILES}, reward_columns=columns,
        rewards=list(t.rewards), eval_from=eval_from(splits, held), notes=splits.report.notes + splits.notes,
        read=splits.report, sample_text=tokenizer.decode(prompt_token_ids(tokenizer, records[sample])),
        sample_columns=records[sample].columns)
    out = Path(out_dir) if out_dir else Path(t.output_dir).expanduser().with_name(Path(t.output_dir).name + "-data")
    out.mkdir(parents=True, exist_ok=True)
    res.json_path = str(out / "data_report.json")
    atomic_write_json(Path(res.json_path), {f.name: getattr(res, f.name) for f in fields(res)
                                            if f.name not in _NOT_IN_JSON})
    return res
