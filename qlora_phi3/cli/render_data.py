"""What ``qlora-phi3 data`` shows: a :class:`~qlora_phi3.data.inspect.DataInspection` (chat data) or a
:class:`~qlora_phi3.data.inspect_pairs.PairInspection` (preference data) as text, with one sample's loss mask, or a
:class:`~qlora_phi3.data.inspect_prompts.PromptInspection` (grpo's prompts) with one prompt as the model sees it."""

from __future__ import annotations

import math

from qlora_phi3.config import Recipe
from qlora_phi3.data.inspect import PERCENTILES, DataInspection, SampleTokens, histogram_bins
from qlora_phi3.data.inspect_pairs import PairInspection
from qlora_phi3.ui import console, info, warn

__all__ = ["print_data_inspection", "print_pair_inspection", "print_prompt_inspection", "render_sample",
           "text_histogram"]


def text_histogram(lengths: list[int], max_seq_len: int, n_bins: int = 12, bar_chars: int = 40) -> list[str]:
    """Rows like ``  256-  512 ████████ 31``; a bin whose samples are all longer than max_seq_len is marked
    ``(cut)``, one where only some are ``(N cut)``."""
    bins = histogram_bins(lengths, n_bins)
    peak = max(c for _, _, c in bins) or 1
    rows = []
    for lo, hi, count in bins:
        bar = "█" * round(bar_chars * count / peak) or ("▏" if count else "")
        cut = sum(1 for n in lengths if lo <= n < hi and n > max_seq_len)  # truncated: longer than max_seq_len
        mark = "" if not cut else "  (cut)" if cut == count else f"  ({cut:,} cut)"
        rows.append(f"{lo:>7,}-{hi:<7,} {bar:<{bar_chars}} {count:>6,}{mark}")
    return rows


def render_sample(sample: SampleTokens, max_seq_len: int, plain: bool | None = None):
    """Print the conversation as the model sees it, token by token: loss tokens highlighted (alternating shades
    show token boundaries), prompt tokens dim, tokens past max_seq_len struck out in red. ``plain`` (default:
    when stdout is not a terminal) marks them in text instead: ``⟦loss⟧``, and ``✂`` where the cut starts.
    Returns the rich ``Text`` or the plain string that was printed."""
    from rich.markup import escape
    from rich.text import Text

    from qlora_phi3.phi3 import IGNORE_INDEX

    shown, labels = sample.pieces, sample.labels
    plain = not console().is_terminal if plain is None else plain
    n_loss = sum(1 for lab in labels[:max_seq_len] if lab != IGNORE_INDEX)
    head = f"\n[bold]sample {sample.index}[/] ({escape(sample.origin)}): {len(labels)} tokens, {n_loss} carry loss  "
    if plain:
        parts, in_loss = [], False

        def close() -> None:  # before the whitespace an <|end|> swallowed, so the mark stays on its line
            last = parts.pop() if parts else ""
            parts.extend([last.rstrip(), "⟧", last[len(last.rstrip()):]])

        for pos, (piece, label) in enumerate(zip(shown, labels)):
            loss = label != IGNORE_INDEX and pos < max_seq_len
            if in_loss and (not loss or pos == max_seq_len):
                close()
            if pos == max_seq_len:
                parts.append("✂")
            elif loss and not in_loss:
                parts.append("⟦")
            in_loss = loss
            parts.append(piece)
        if in_loss:
            close()
        out = "".join(parts)
        info(head + f"(plain text: loss on ⟦...⟧, no loss elsewhere; ✂ = cut by data.max_seq_len={max_seq_len})")
        console().print(out, markup=False, highlight=False)
        return out
    out, shade = Text(), 0
    for pos, (piece, label) in enumerate(zip(shown, labels)):
        if pos >= max_seq_len:
            style = "strike red"
        elif label != IGNORE_INDEX:
            style = ("bold black on green3", "bold black on dark_sea_green2")[shade]
            shade ^= 1
        else:
            style = "grey50"
        out.append(piece, style=style)
    info(head + "[bold black on green3] loss [/] [grey50]no loss[/] [strike red]cut by max_seq_len[/]")
    console().print(out)
    return out


def _print_skipped(read) -> None:
    for line in read.summary_lines():
        info(f"  {line}")


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "0%"


def _print_notes_and_skipped(notes: list[str], read, d, allows: str = "") -> None:
    for note in notes:
        info(f"  note: {note}")
    if read.n_bad or read.duplicates:
        warn(f"{read.n_bad:,} bad records skipped (data.max_bad_fraction={d.max_bad_fraction}{allows}); "
             f"{len(read.duplicates):,} exact duplicates:")
        _print_skipped(read)


def print_data_inspection(res: DataInspection, recipe: Recipe) -> None:
    """How the data was read, its token lengths, what max_seq_len cuts, one epoch in steps, the sample, the files."""
    d, t, read = recipe.data, recipe.train, res.read
    info(f"[bold]{res.source}[/]: {res.records_read:,} records read as [bold]{res.format}[/] "
         f"({read.format_origin}); {res.usable_in_file:,} usable")
    _print_notes_and_skipped(read.notes, read, d, f" allows {d.max_bad_fraction:.0%}")
    if d.max_samples:
        info(f"  data.max_samples={d.max_samples}: inspecting the first {res.usable:,}")
    pct = "  ".join(f"{k} {v:,}" for k, v in res.percentiles.items()).replace("p100", "max")
    info(f"\n[bold]token lengths[/] (the model's chat template, before truncation): {pct}")
    for row in text_histogram(res.token_lengths, d.max_seq_len):
        info(f"  {row}")
    info(f"\n[bold]data.max_seq_len={d.max_seq_len:,}[/] cuts {res.truncated:,} of {res.usable:,} conversations "
         f"({_share(res.truncated, res.usable)}) and {res.assistant_tokens_lost:,} of {res.assistant_tokens:,} "
         f"assistant tokens ({_share(res.assistant_tokens_lost, res.assistant_tokens)}); {res.dropped:,} keep no "
         "assistant token and are dropped.")
    if res.end_unlabelled:
        warn(f"{len(res.end_unlabelled)} conversations have an assistant turn whose {'<|end|>'} carries no label "
             f"(e.g. {', '.join(res.end_unlabelled[:3])}): the model would not learn to stop. Check the chat template.")
    else:
        info("every assistant turn's <|end|> carries a label (the model learns to stop).")
    if res.end_cut:
        warn(f"in {len(res.end_cut)} truncated conversations an assistant turn's <|end|> lies beyond "
             f"data.max_seq_len (e.g. {', '.join(res.end_cut[:3])}): those replies are trained without their end.")
    effective = t.micro_batch_size * t.grad_accum
    eval_part = f"{res.eval_samples:,} held out for eval" if not d.eval_split else f"eval from split {d.eval_split!r}"
    unit = f"packed rows of {d.max_seq_len:,} tokens" if d.packing else "conversations"
    info(f"\n[bold]per epoch[/]: {res.train_samples:,} train conversations ({eval_part}), "
         f"{res.tokens_per_epoch:,} tokens, {res.loss_tokens_per_epoch:,} with loss; "
         f"{res.steps_per_epoch:,} optimizer steps at micro_batch_size {t.micro_batch_size} x grad_accum "
         f"{t.grad_accum} = {effective} {unit} per step (one process).")
    if d.packing:
        fill = res.tokens_per_epoch / (res.packed_rows * d.max_seq_len) if res.packed_rows else 0.0
        info(f"packing: {res.packed_rows:,} rows, {fill:.0%} real tokens (no padding inside a row; the last row of "
             "each micro-batch may be short); data.packing=false pads each micro-batch instead.")
    else:
        (warn if res.padding_warns else info)(res.padding_note)
    if t.max_steps > 0:
        info(f"train.max_steps={t.max_steps:,} is {t.max_steps / res.steps_per_epoch:.2f} epochs.")
    else:
        info(f"train.epochs={t.epochs:g} is {math.ceil(t.epochs * res.steps_per_epoch):,} steps.")
    render_sample(res.sample, d.max_seq_len)
    info(f"\nhistogram: [bold]{res.png_path}[/]   numbers: {res.json_path}   (choose the folder with --out DIR)")


def print_pair_inspection(res: PairInspection, recipe: Recipe) -> None:
    """How the preference data was read, prompt / answer / row lengths, what the limits cut, the sample's answers."""
    d, read = recipe.data, res.read
    info(f"[bold]{res.source}[/]: {res.records_read:,} records read as [bold]{read.format}[/] for "
         f"train.method={res.method}; {res.usable:,} usable ({res.train:,} train / {res.eval:,} eval: "
         f"{res.eval_from})")
    _print_notes_and_skipped(res.notes, read, d)
    info("tokens (percentiles " + "/".join(f"p{p}" for p in PERCENTILES) + "): " + "; ".join(
        f"{name} {'/'.join(str(v) for v in pct.values())}" for name, pct in res.token_lengths.items()))
    what = "pair" if res.paired else "record"
    line = (f"data.max_seq_len={res.max_seq_len} per row, data.max_prompt_len={res.max_prompt_len}: {res.prompts_cut} "
            f"prompts cut (their last turns kept), {res.answers_cut} {what}s with an answer cut "
            f"({res.answer_tokens_lost:,} answer tokens lost), {res.dropped} {what}s dropped (the prompt fills a row)")
    (warn if res.answers_cut or res.dropped else info)(line)
    for name, sample in res.samples.items():
        info(f"[bold]{name}[/] answer:")
        render_sample(sample, res.max_seq_len)
    info(f"report: {res.json_path}")


def print_prompt_inspection(res, recipe: Recipe) -> None:
    """grpo's prompts: how they were read, their token lengths against the limit, the columns the rewards get."""
    info(f"[bold]{res.source}[/]: {res.records_read:,} records read as [bold]prompts[/] for train.method="
         f"{recipe.train.method}; {res.usable:,} usable ({res.train:,} train / {res.eval:,} eval: {res.eval_from})")
    _print_notes_and_skipped(res.notes, res.read, recipe.data)
    info("prompt tokens (percentiles " + "/".join(f"p{p}" for p in PERCENTILES) + "): "
         + "/".join(str(v) for v in res.token_lengths.values()) + f"; limit {res.prompt_limit} (data.max_prompt_len, "
         f"or data.max_seq_len - train.max_completion_len={res.max_completion_len}); "
         f"{res.num_generations} completions per prompt")
    info(f"rewards {', '.join(res.rewards) or '(none: set train.rewards)'} receive the columns: "
         f"{', '.join(res.reward_columns) or '(none besides prompt)'}")
    info("[bold]prompt[/] as the model sees it (generation starts after it):")
    console().print(res.sample_text, markup=False, highlight=False)
    info(f"its columns: {res.sample_columns}")
    info(f"report: {res.json_path}")
