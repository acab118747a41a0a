"""SFT: supervised fine-tuning on chats with TRL's SFTTrainer (:mod:`qlora_phi3.run.methods.sft_trainer`), the
default method.

Assistant-only labels from :mod:`qlora_phi3.data.encode`, optional leak-free packing, the chunked loss.
"""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.data.encode import encode_records
from qlora_phi3.data.packing import length_group, padding_advice
from qlora_phi3.data.split import load_splits
from qlora_phi3.errors import UserError
from qlora_phi3.phi3 import IGNORE_INDEX
from qlora_phi3.run.methods.base import (MethodData, build_method_trainer, common_arguments, eval_fields_of,
                                         report_splits)
from qlora_phi3.ui import info, plural, warn

__all__ = ["build_trainer", "eval_fields", "load_data", "training_arguments"]

eval_fields = eval_fields_of(__name__)  # none beyond the eval loss


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


def load_data(recipe: Recipe, tokenizer, records=None) -> MethodData:
    d = recipe.data
    splits = load_splits(d, recipe.train.seed, records)
    report_splits(splits)
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
                  **kwargs):
    """The trainer, its rich progress callback and its memory meter. The training samples are packed into rows of
    ``data.max_seq_len`` tokens when ``data.packing`` is on; eval stays unpacked, so eval losses compare across
    packing on and off."""
    from datasets import Dataset

    from qlora_phi3.data.packing import PackingCollator, pack_columns
    from qlora_phi3.run.methods.sft_trainer import QLoRATrainer

    train = data.train
    packed = Dataset.from_dict(pack_columns(train.input_ids, train.labels, recipe.data.max_seq_len)) \
        if recipe.data.packing else None
    trainer, progress, meter = build_method_trainer(
        QLoRATrainer, model, tokenizer, args, data, device, recipe=recipe, measuring=measuring, train_dataset=packed,
        # Pre-tokenized with labels: SFTTrainer keeps our assistant-only labels as they are.
        data_collator=PackingCollator(tokenizer.pad_token_id), **kwargs)
    if not measuring and data.eval.input_ids:
        trainer.eval_rows_and_tokens = (len(data.eval.input_ids), sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX)
                                                                      for lab in data.eval.labels))
    if trainer.is_fsdp_enabled:
        from peft.utils.other import fsdp_auto_wrap_policy  # the import PEFT's FSDP guide uses

        # PEFT's documented FSDP-QLoRA setup: with use_orig_params=False the trainable LoRA weights and the frozen
        # 4-bit weights must land in different flat parameters, so they are wrapped apart.
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    return trainer, progress, meter
