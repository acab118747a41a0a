"""Which records are held out for eval: the one rule for chat conversations and preference records alike.

* ``data.eval_split`` names a split of a source that has splits (a Hugging Face dataset, or a
  ``DatasetDict.save_to_disk`` directory). A single file has none: the name is ignored, loudly (a note the caller
  shows as a warning), and ``data.eval_fraction`` is held out instead (otherwise the whole file would be loaded
  again as eval, and every eval number would be measured on training data).
* Without a usable eval split, a seeded ``data.eval_fraction`` of the records (at most ``data.max_eval_samples``)
  is held out.
* Train and eval never share a record: eval records whose key (a conversation; a preference record's prompt) also
  occurs in the training set (a dataset whose splits overlap, the same file given twice) are dropped and counted.

Chat data (:mod:`qlora_phi3.data.split`) and preference data (:mod:`qlora_phi3.data.preference`) both call
:func:`split_records`; this module imports neither.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from qlora_phi3.config import DataConfig
from qlora_phi3.data.read import LoadReport, has_named_splits
from qlora_phi3.errors import UserError

__all__ = ["Splits", "hold_out", "split_records"]


@dataclass
class Splits:
    train: list  # ChatRecord, or a preference record (PairRecord, UnpairedRecord)
    eval: list
    report: LoadReport  # of the training split
    eval_from: str  # how the eval records were chosen, in words
    notes: list[str] = field(default_factory=list)  # things the user must hear (a split name ignored, overlap)
    eval_overlap_dropped: int = 0


def hold_out(records: list, eval_fraction: float, max_eval: int, seed: int):
    """A seeded, reproducible held-out split: (train, eval)."""
    if len(records) < 2:
        raise UserError(f"need at least 2 usable records to hold one out for eval (data.eval_fraction), got "
                        f"{len(records)}: add records, or name a held-out split (data.eval_split).")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_eval, max(1, round(len(records) * eval_fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def split_records(cfg: DataConfig, seed: int, records: list, report: LoadReport, read_split: Callable[[str], list],
                  key: Callable, noun: str, measured: str) -> Splits:
    """``records`` (``cfg``'s training split, read) split into train and eval by the module's rules.

    read_split: reads the records of a named split (``cfg.eval_split``).
    key: what the overlap check compares (two records with the same key never sit on both sides).
    noun: what a record is, in messages ("conversation", "prompt"); measured: what eval measures ("eval losses").
    """
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    notes: list[str] = []
    named = bool(cfg.eval_split) and has_named_splits(cfg)
    if cfg.eval_split and not named:
        notes.append(f"data.eval_split={cfg.eval_split!r} ignored: {report.source} has no named splits (a single "
                     f"file), so {cfg.eval_fraction:.0%} of it (data.eval_fraction, at most data.max_eval_samples="
                     f"{cfg.max_eval_samples}) is held out for eval instead. Set data.eval_split=null to silence this.")
    if named:
        train, held = records, read_split(cfg.eval_split)
        eval_from = f"split {cfg.eval_split!r} of {cfg.path}"
    else:
        train, held = hold_out(records, cfg.eval_fraction, cfg.max_eval_samples, seed)
        eval_from = f"{len(held)} held out of {report.source} (data.eval_fraction={cfg.eval_fraction:g}, seed {seed})"
    seen = {key(r) for r in train}
    kept = [r for r in held if key(r) not in seen]
    dropped = len(held) - len(kept)
    if not kept:
        raise UserError(f"every eval {noun} ({eval_from}) is also in the training data, so {measured} would measure "
                        f"memorisation. Point data.eval_split at a split with other {noun}s, or set "
                        "data.eval_split=null to hold out data.eval_fraction of the training data.")
    if dropped:
        notes.append(f"{dropped} eval {noun}{'s' if dropped != 1 else ''} also in the training data dropped from "
                     f"eval ({eval_from}): train and eval never overlap.")
    return Splits(train, kept[: cfg.max_eval_samples], report, eval_from, notes, dropped)
