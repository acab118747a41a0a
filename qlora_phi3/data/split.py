"""Train and eval conversations: the one place that decides which conversations are held out.

Training, ``qlora-phi3 data`` and the merge report all call :func:`load_splits`, so they see the same
split. Rules:

* ``data.eval_split`` names a split of a source that has splits (a Hugging Face dataset, or a
  ``DatasetDict.save_to_disk`` directory). A single file has none: the name is ignored, loudly, and
  ``data.eval_fraction`` is held out instead (otherwise the whole file would be loaded again as eval,
  and every eval loss would be measured on training data).
* Without a usable eval split, a seeded ``data.eval_fraction`` of the conversations (at most
  ``data.max_eval_samples``) is held out.
* Train and eval never share a conversation: eval conversations that also occur in the training set
  (a dataset whose splits overlap, or the same file given twice) are dropped from eval and counted.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from qlora_phi3.config import DataConfig
from qlora_phi3.data.read import ChatRecord, LoadReport, has_named_splits, load_records
from qlora_phi3.errors import UserError

__all__ = ["Splits", "held_out_records", "hold_out", "load_splits"]


@dataclass
class Splits:
    train: list[ChatRecord]
    eval: list[ChatRecord]
    report: LoadReport  # of the training split
    eval_from: str  # how the eval conversations were chosen, in words
    notes: list[str] = field(default_factory=list)  # things the user must hear (a split name ignored, overlap)
    eval_overlap_dropped: int = 0


def hold_out(records: list[ChatRecord], eval_fraction: float, max_eval: int, seed: int):
    """A seeded, reproducible held-out split: (train, eval)."""
    if len(records) < 2:
        raise UserError(f"need at least 2 usable conversations to hold one out for eval, got {len(records)}.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_eval, max(1, round(len(records) * eval_fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _digest(record: ChatRecord) -> bytes:
    return hashlib.blake2b(json.dumps(record.messages, ensure_ascii=False).encode(), digest_size=16).digest()


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Read ``cfg``'s data and split it into train and eval conversations (see the module docstring)."""
    records, report = load_records(cfg)
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    notes: list[str] = []
    if cfg.eval_split and not has_named_splits(cfg):
        notes.append(f"data.eval_split={cfg.eval_split!r} ignored: {report.source} has no named splits (a single "
                     f"file), so {cfg.eval_fraction:.0%} of it (data.eval_fraction, at most data.max_eval_samples="
                     f"{cfg.max_eval_samples}) is held out for eval instead. Set data.eval_split=null to silence this.")
    if cfg.eval_split and has_named_splits(cfg):
        train = records
        eval_recs = load_records(cfg, split=cfg.eval_split)[0]
        eval_from = f"split {cfg.eval_split!r} of {cfg.path}"
    else:
        train, eval_recs = hold_out(records, cfg.eval_fraction, cfg.max_eval_samples, seed)
        eval_from = f"{len(eval_recs)} held out of {report.source} (data.eval_fraction={cfg.eval_fraction:g}, seed {seed})"
    seen = {_digest(r) for r in train}
    kept = [r for r in eval_recs if _digest(r) not in seen]
    dropped = len(eval_recs) - len(kept)
    if not kept:
        raise UserError(f"every eval conversation ({eval_from}) is also in the training data, so eval losses would "
                        "measure memorisation. Point data.eval_split at a split with other conversations, or set "
                        "data.eval_split=null to hold out data.eval_fraction of the training data.")
    if dropped:
        notes.append(f"{dropped} eval conversation{'s' if dropped != 1 else ''} also in the training data dropped from "
                     f"eval ({eval_from}): train and eval never overlap.")
    return Splits(train, kept[: cfg.max_eval_samples], report, eval_from, notes, dropped)


def held_out_records(recipe, run: dict | None, tokenizer, max_seq_len: int, n: int) -> tuple[list, str]:
    """Up to ``n`` held-out conversations to compare models on (merge's report, export's check): the run's own
    eval split, rebuilt as training built it, when the run's recipe and data are still there; else the bundled
    synthetic set's held-out split. Returns them and where they came from."""
    from qlora_phi3.config import TrainConfig
    from qlora_phi3.data.encode import encode_records
    from qlora_phi3.ui import warn

    records, where = None, ""
    if recipe is not None:
        try:
            method = getattr(recipe.train, "method", "sft")
            if method != "sft":  # a preference run: its held-out prompts with the chosen (or desirable) answer
                from qlora_phi3.data.preference import load_preference_splits

                records = load_preference_splits(recipe.data, method, recipe.train.seed).eval_chats
                return records[:n], f"the run's held-out preference prompts with their chosen answers ({recipe.data.path})"
            records = load_splits(recipe.data, recipe.train.seed).eval
            where = f"the run's eval split ({recipe.data.path})"
            recorded = (run or {}).get("dataset", {}).get("eval_fingerprint")
            if recorded and encode_records(records, tokenizer, max_seq_len).fingerprint() != recorded:
                where += ", rebuilt: differs from the split the run evaluated on"
                warn("the eval split rebuilt from the run's recipe differs from the one the run used (its data "
                     "file or qlora-phi3 changed since); the models are still compared on the same samples.")
        except UserError as e:
            warn(f"cannot rebuild the run's eval split ({e}); using the bundled samples instead.")
    if records is None:
        records = load_splits(DataConfig(), TrainConfig().seed).eval
        where = "bundled synthetic samples (held-out split of the default recipe)"
    return records[:n], where
