"""Train and eval conversations: which conversations are held out for eval, by the one rule of
:mod:`qlora_phi3.data.holdout` (shared with preference data).

Training, ``qlora-phi3 data`` and the merge report all call :func:`load_splits`, so they see the same split.
"""

from __future__ import annotations

from qlora_phi3.config import DataConfig
from qlora_phi3.data.holdout import Splits, hold_out, split_records
from qlora_phi3.data.read import LoadReport, digest, load_records
from qlora_phi3.errors import UserError
from qlora_phi3.methods import DEFAULT_METHOD, METHODS

__all__ = ["Splits", "held_out_records", "hold_out", "load_splits", "read_training_records"]


def read_training_records(cfg: DataConfig, method: str) -> tuple[list, LoadReport]:
    """The records of ``cfg``'s training split as ``method`` reads them (conversations, preference records or
    prompts, by its data kind), validated record by record, and the report of what was skipped and where: what
    ``train`` reads once, before torch loads, and hands to the method's ``load_data``."""
    kind = METHODS[method].data
    if kind == "chat":
        return load_records(cfg)
    if kind == "prompts":
        from qlora_phi3.data.prompts import load_prompt_records

        return load_prompt_records(cfg)
    from qlora_phi3.data.preference import load_preference_records

    return load_preference_records(cfg, method)


def load_splits(cfg: DataConfig, seed: int, records: tuple[list, LoadReport] | None = None) -> Splits:
    """Read ``cfg``'s data and split it into train and eval conversations (:mod:`qlora_phi3.data.holdout`).
    ``records``: the training split's conversations and report, already read (:func:`read_training_records`)."""
    records, report = records or load_records(cfg)
    return split_records(cfg, seed, records, report, lambda name: load_records(cfg, split=name)[0],
                         key=lambda r: digest(r.messages), noun="conversation", measured="eval losses")


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
            method = getattr(recipe.train, "method", DEFAULT_METHOD)
            if METHODS[method].preference:  # a preference run: its held-out prompts with the chosen (or desirable) answer
                from qlora_phi3.data.preference import eval_chats, load_preference_splits

                records = eval_chats(load_preference_splits(recipe.data, method, recipe.train.seed).eval)
                return records[:n], f"the run's held-out preference prompts with their chosen answers ({recipe.data.path})"
            if METHODS[method].data == "prompts":  # a GRPO run: its held-out prompts, the answer column as the reply
                from qlora_phi3.data.prompts import answer_chats, load_prompt_splits

                column = recipe.train.answer_column
                records = answer_chats(load_prompt_splits(recipe.data, recipe.train.seed).eval, column)
                return records[:n], (f"the run's held-out prompts with their {column!r} column as the answer "
                                     f"({recipe.data.path})")
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
