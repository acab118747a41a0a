"""``qlora-phi3 data RECIPE``: what the model will really be trained on, before any GPU time is spent.

Loads the recipe's data with the same validation and policy as training, and the tokenizer (never the
model); tokenizes every conversation exactly as training does (``data.encode.encode_conversation``) and
measures: counts and skipped records, token-length percentiles and a histogram (the PNG here), what
``data.max_seq_len`` cuts (samples, assistant tokens, closing ``<|end|>`` labels), tokens and steps per
epoch for the recipe's batch settings, and one conversation token by token with its labels. It returns them as
a :class:`DataInspection`, which ``cli/render_data.py`` shows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from qlora_phi3.config import Recipe, recipe_to_dict
from qlora_phi3.data.read import LoadReport
from qlora_phi3.errors import UserError
from qlora_phi3.ui import console

__all__ = ["DataInspection", "SampleTokens", "histogram_bins", "inspect_data", "percentile", "sample_tokens",
           "token_texts"]

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class SampleTokens:
    """One conversation as the model sees it, token by token: what each token stands for, and its label."""
    index: int  # among the usable records (--sample)
    origin: str  # file:line
    pieces: list[str]  # one per token (token_texts); they join back into the chat-template text
    labels: list[int]  # IGNORE_INDEX where the token carries no loss


@dataclass
class DataInspection:
    source: str
    format: str
    records_read: int
    usable: int  # inspected: after data.max_samples
    skipped: int
    duplicates: int
    train_samples: int  # after the eval hold-out and data.max_samples, before truncation drops
    eval_samples: int
    max_seq_len: int
    token_lengths: list[int] = field(repr=False)  # every usable conversation, before truncation
    usable_in_file: int  # before data.max_samples
    read: LoadReport = field(repr=False)  # how the file was read: format origin, notes, skipped records (file:line)
    sample: SampleTokens = field(repr=False)  # the --sample conversation
    percentiles: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # samples longer than max_seq_len (all usable conversations)
    dropped: int = 0  # truncated so far that no assistant token is left: training drops them
    assistant_tokens: int = 0  # before truncation
    assistant_tokens_lost: int = 0
    end_unlabelled: list[str] = field(default_factory=list)  # origins: an assistant <|end|> without label
    end_cut: list[str] = field(default_factory=list)  # origins: an assistant <|end|> beyond max_seq_len
    tokens_per_epoch: int = 0  # train split, after truncation
    loss_tokens_per_epoch: int = 0
    steps_per_epoch: int = 0
    packed_rows: int | None = None  # data.packing: rows of max_seq_len tokens per epoch
    padded_share: float | None = None  # no packing: share of padding in the micro-batches of one epoch
    padding_note: str = ""  # what that costs, in words (the same sentence train prints)
    padding_warns: bool = False
    png_path: str = ""
    json_path: str = ""


# Inputs behind the numbers, not numbers: left out of data_report.json (it has its own skipped_reasons and notes).
_NOT_IN_JSON = ("token_lengths", "usable_in_file", "read", "sample")


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list (p=100 is the maximum)."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def histogram_bins(lengths: list[int], n_bins: int) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of one round width (1, 2 or 5 x 10^k) covering min..max(lengths)."""
    raw = max(lengths) / n_bins
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    width = next(int(m * magnitude) for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = min(lengths) // width
    counts = [0] * (max(lengths) // width + 1 - first)
    for n in lengths:
        counts[n // width - first] += 1
    return [((first + i) * width, (first + i + 1) * width, c) for i, c in enumerate(counts)]


def _encode_all(records, tokenizer) -> list[tuple[list[int], list[int]]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from qlora_phi3.data.encode import encode_conversation, reply_markers

    markers = reply_markers(tokenizer)
    out = []
    # Off where it cannot show (a file or a pipe), where rich's transient bar would still leave an empty line.
    with Progress(TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console(), transient=True, disable=not console().is_terminal) as bar:
        task = bar.add_task("tokenize", total=len(records))
        for rec in records:
            try:
                out.append(encode_conversation(tokenizer, rec.messages, markers))
            except UserError as e:
                raise UserError(f"{rec.origin}: {e}") from None
            bar.advance(task)
    return out


def _write_png(lengths: list[int], max_seq_len: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = histogram_bins(lengths, 40)
    ax.hist(lengths, bins=[b[0] for b in bins] + [bins[-1][1]], color="#4c72b0")
    ax.axvline(max_seq_len, color="#c44e52", linestyle="--", label=f"data.max_seq_len = {max_seq_len:,}")
    ax.set_xlabel("tokens per conversation (the model's chat template)")
    ax.set_ylabel("conversations")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's printable character -> byte map, inverted (byte-level BPE vocabularies are written in it):
    printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def token_texts(tokenizer, text: str, ids: list[int]) -> list[str]:
    """What each token of ``ids`` (the tokenization of ``text``) stands for, as display strings.

    Decided from the ids, not from the tokenizer's offsets: for SentencePiece-style tokens the offsets
    are not character positions (Phi-3's ``▁0`` maps onto the ``0`` the next token also maps onto, and a
    4-byte emoji's byte-fallback tokens each map onto the whole emoji). Byte tokens are decoded as UTF-8
    together, so a character spelled in several byte tokens shows once, on its last byte. An added token
    (``<|end|>``, ...) shows with the whitespace it swallows (Phi-3's ``rstrip``), taken from the text.
    Between added tokens, the ``▁`` the normalizer prepends to each piece of text is dropped, so the
    strings join back into ``text``."""
    import codecs

    from qlora_phi3.family import family_for_tokenizer

    added = tokenizer.added_tokens_decoder
    pieces = tokenizer.convert_ids_to_tokens(ids)
    # Byte-level BPE (Phi-4-mini): every piece is bytes written in GPT-2's printable map ('Ġ' is a space).
    byte_map = _gpt2_unicode_to_byte() if family_for_tokenizer(tokenizer).tokenizer_kind == "byte_bpe" else None
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out: list[str] = []
    segment: list[int] = []  # positions of the current run of ordinary tokens
    seg_start = 0  # where that run's text starts

    def close_segment(seg_end: int) -> None:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        shown = []
        for pos in segment:
            piece = pieces[pos]
            if byte_map is not None:
                shown.append(utf8.decode(bytes(byte_map[c] for c in piece)))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                shown.append(utf8.decode(bytes([int(piece[3:5], 16)])))
            else:
                shown.append(utf8.decode(b"", final=True) + piece.replace("\u2581", " "))
        if shown:
            shown[-1] += utf8.decode(b"", final=True)
        original = text[seg_start:seg_end]
        joined = "".join(shown)
        if joined != original and joined == " " + original:  # the normalizer's prefix space
            first = next(k for k, sh in enumerate(shown) if sh)
            shown[first] = shown[first][1:]
        out.extend(shown)
        segment.clear()

    for pos, token_id in enumerate(ids):
        if token_id in added:
            start, end = offsets[pos]
            close_segment(start)
            out.append(text[start:end] or str(added[token_id]))
            seg_start = end
        else:
            segment.append(pos)
    close_segment(len(text))
    return out


def sample_tokens(tokenizer, record, ids: list[int], labels: list[int], index: int) -> SampleTokens:
    """Record number ``index`` as the model sees it; ``ids`` and ``labels`` are its ``encode_conversation``."""
    text = tokenizer.apply_chat_template(record.messages, tokenize=False)
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:  # cannot happen; guard what is shown
        raise RuntimeError("re-tokenizing the sample gave different ids than encode_conversation")
    return SampleTokens(index, record.origin, token_texts(tokenizer, text, ids), labels)


def _default_out_dir(recipe: Recipe) -> Path:
    # Beside the run directory, not inside it: training refuses a non-empty output_dir that is not a run.
    run_dir = Path(recipe.train.output_dir).expanduser()
    return run_dir.with_name(run_dir.name + "-data")


def inspect_data(recipe: Recipe, tokenizer, sample: int = 0, out_dir: str | Path | None = None) -> DataInspection:
    """Validate, tokenize (with ``tokenizer``, the recipe model's) and measure ``recipe``'s training data, with
    conversation number ``sample`` token by token; write a PNG histogram and a JSON summary."""
    from qlora_phi3.data.packing import length_group, pack_rows, padding_advice
    from qlora_phi3.data.read import load_records
    from qlora_phi3.data.split import hold_out
    from qlora_phi3.files import atomic_write_json
    from qlora_phi3.data.encode import reply_markers
    from qlora_phi3.phi3 import IGNORE_INDEX

    d, t = recipe.data, recipe.train
    records, report = load_records(d)
    usable_in_file = len(records)
    if d.max_samples:
        records = records[: d.max_samples]
    if not 0 <= sample < len(records):
        raise UserError(f"--sample {sample}: there are {len(records)} usable conversations; pick 0 to "
                        f"{len(records) - 1}.")
    if d.eval_split:
        train_recs, n_eval = records, None
    else:
        train_recs, eval_recs = hold_out(records, d.eval_fraction, d.max_eval_samples, t.seed)
        n_eval = len(eval_recs)
    train_origins = {r.origin for r in train_recs}

    end_id = reply_markers(tokenizer)[1]  # the family's end of turn (<|end|>; Phi-4: <|im_end|>)
    encoded = _encode_all(records, tokenizer)
    lengths = [len(ids) for ids, _ in encoded]
    ordered = sorted(lengths)
    res = DataInspection(
        source=report.source, format=report.format, records_read=report.total, usable=len(records),
        skipped=report.n_skipped, duplicates=len(report.duplicates), train_samples=len(train_recs),
        eval_samples=n_eval if n_eval is not None else 0, max_seq_len=d.max_seq_len, token_lengths=lengths,
        usable_in_file=usable_in_file, read=report,
        sample=sample_tokens(tokenizer, records[sample], *encoded[sample], sample),
        percentiles={f"p{p}": percentile(ordered, p) for p in PERCENTILES})
    train_lengths = []  # after truncation, of the train conversations training keeps
    for rec, (ids, labels) in zip(records, encoded):
        loss_at = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
        labelled_ends = [i for i in loss_at if ids[i] == end_id]
        n_assistant = sum(1 for m in rec.messages if m["role"] == "assistant")
        res.assistant_tokens += len(loss_at)
        if len(labelled_ends) != n_assistant:
            res.end_unlabelled.append(rec.origin)
        kept = [i for i in loss_at if i < d.max_seq_len]
        if len(ids) > d.max_seq_len:
            res.truncated += 1
            res.assistant_tokens_lost += len(loss_at) - len(kept)
            res.dropped += not kept
            if any(i >= d.max_seq_len for i in labelled_ends):
                res.end_cut.append(rec.origin)
        if rec.origin in train_origins and kept:
            train_lengths.append(min(len(ids), d.max_seq_len))
            res.loss_tokens_per_epoch += len(kept)
    res.tokens_per_epoch = sum(train_lengths)
    if d.packing:  # the rows training builds (data/packing.py), each a micro-batch row
        res.packed_rows = len(pack_rows(train_lengths, d.max_seq_len))
        rows = res.packed_rows
    else:
        res.padded_share, res.padding_note, res.padding_warns = padding_advice(train_lengths, t.micro_batch_size,
                                                                              t.seed, length_group(recipe))
        rows = len(train_lengths)
    # transformers' Trainer: ceil(rows / micro_batch) batches, ceil(batches / grad_accum) steps
    res.steps_per_epoch = max(1, math.ceil(math.ceil(rows / t.micro_batch_size) / t.grad_accum))

    out = Path(out_dir).expanduser() if out_dir else _default_out_dir(recipe)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the directory ({e.strerror}).") from None
    png = out / "token_lengths.png"
    _write_png(lengths, d.max_seq_len, f"{report.source} ({len(records):,} conversations)", png)
    res.png_path, res.json_path = str(png), str(out / "data_report.json")
    summary = {f.name: getattr(res, f.name) for f in fields(res) if f.name not in _NOT_IN_JSON}
    atomic_write_json(Path(res.json_path), {**summary, "recipe": recipe_to_dict(recipe),
                                            "skipped_reasons": report.summary_lines(examples=5),
                                            "notes": report.notes})
    return res
