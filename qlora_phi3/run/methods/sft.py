"""SFT: supervised fine-tuning on chats with TRL's SFTTrainer (:mod:`qlora_phi3.run.trainer`), the default method.

Assistant-only labels from :mod:`qlora_phi3.data.encode`, optional leak-free packing, the chunked loss.
"""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.data.encode import encode_records
from qlora_phi3.data.packing import length_group, padding_advice
from qlora_phi3.data.split import load_splits
from qlora_phi3.errors import UserError
from qlora_phi3.run.methods.base import MethodData, common_arguments
from qlora_phi3.ui import info, plural, warn

NAME = "sft"


def training_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool):
    from trl import SFTConfig

    return SFTConfig(
        **common_arguments(recipe, output_dir, device, compute_dtype, measuring),
        neftune_noise_alpha=recipe.train.neftune_noise_alpha,  # the Trainer's NEFTune hook on the input embeddings
        include_num_input_tokens_seen="non_padding",
        max_length=None,  # already truncated (and counted) in data.encode.encode_records
        packing=False,  # ours: data/packing.py
        # Unpacked, micro-batches of similar lengths pad less (data.group_by_length; the padding line says how much).
        train_sampling_strategy="group_by_length" if length_group(recipe) else "random",
    )


def load_data(recipe: Recipe, tokenizer) -> MethodData:
    d = recipe.data
    splits = load_splits(d, recipe.train.seed)
    report = splits.report
    if report.n_skipped:
        warn(f"skipped {report.n_skipped} of {report.total} records in {report.source}:")
        for line in report.summary_lines():
            info(f"  {line}")
    for note in report.notes:
        info(f"data: {note}")
    for note in splits.notes:
        warn(note)
    train_enc = encode_records(splits.train, tokenizer, d.max_seq_len)
    eval_enc = encode_records(splits.eval, tokenizer, d.max_seq_len)
    if not train_enc.input_ids:
        raise UserError(f"no training sample keeps an assistant token within data.max_seq_len={d.max_seq_len}; "
                        "raise data.max_seq_len.")
    if not eval_enc.input_ids:
        raise UserError("no eval sample keeps an assistant token within data.max_seq_len; raise data.max_seq_len.")
    info(f"data: {plural(len(train_enc.input_ids), 'train conversation')} / {len(eval_enc.input_ids):,} eval "
         f"({splits.eval_from}), {train_enc.n_tokens:,} train tokens ({train_enc.n_label_tokens:,} with loss)")
    for name, enc in (("train", train_enc), ("eval", eval_enc)):
        if enc.truncated:
            warn(f"{plural(enc.truncated, name + ' sample')} longer than data.max_seq_len={d.max_seq_len} "
                 f"{'was' if enc.truncated == 1 else 'were'} truncated ({enc.dropped} dropped: no assistant token "
                 f"left; {enc.assistant_tokens_lost:,} assistant tokens lost).")
    share = None
    if not d.packing:
        share, line, serious = padding_advice([len(x) for x in train_enc.input_ids], recipe.train.micro_batch_size,
                                              recipe.train.seed, length_group(recipe))
        (warn if serious else info)(line)
    dataset = {"train_samples": len(train_enc.input_ids), "eval_samples": len(eval_enc.input_ids),
               "train_tokens": train_enc.n_tokens, "truncated": train_enc.truncated + eval_enc.truncated,
               "padded_share_per_epoch": None if share is None else round(share, 4)}
    return MethodData(train_enc, eval_enc, splits.eval, dataset, share)


def build_trainer(model, tokenizer, args, data: MethodData, device: str, *, recipe: Recipe, measuring: bool,
                  cpu_memory: str, callbacks: list):
    from qlora_phi3.run.trainer import build_trainer as build_sft_trainer

    return build_sft_trainer(
        model, tokenizer, args, data.train, None if measuring else data.eval, device,
        packing_max_seq_len=recipe.data.max_seq_len if recipe.data.packing else None,
        loss_chunk_tokens=recipe.train.loss_chunk_tokens, cpu_memory=cpu_memory, callbacks=callbacks)


def eval_fields(metrics: dict) -> dict:
    """run.json fields from an evaluation's metrics, beyond the eval loss (none for SFT)."""
    return {}
