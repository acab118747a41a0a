"""KTO: answers labelled desirable or not, against a frozen reference (TRL's KTOTrainer).

The reference is the 4-bit base with the adapter off, as for DPO (:mod:`qlora_phi3.run.methods.preference`).
KTO's KL term scores each prompt with another record's answer from the same micro-batch: one more batch of rows
through the policy (no gradient) and the reference, so ``train.micro_batch_size`` must be 2 or more.
"""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.run.methods.base import MethodData, common_arguments, eval_fields_of
from qlora_phi3.run.methods.preference import (build_reference_trainer, load_preference_data, preference_arguments,
                                               reference_trainer_class)

__all__ = ["build_trainer", "eval_fields", "load_data", "training_arguments"]

load_data = load_preference_data
eval_fields = eval_fields_of(__name__)


def training_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool):
    from trl import KTOConfig

    t = recipe.train
    return KTOConfig(**common_arguments(recipe, output_dir, device, compute_dtype, measuring),
                     **preference_arguments(recipe), desirable_weight=t.kto_desirable_weight,
                     undesirable_weight=t.kto_undesirable_weight, precompute_ref_log_probs=t.precompute_ref_log_probs)


def _trainer_class():
    from trl import KTOTrainer

    class PreferenceKTOTrainer(reference_trainer_class(KTOTrainer)):
        _ROW_KEYS = ("",)  # the KL rows run without gradient: counted as compute, not as training tokens

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Already tokenized by data.preference (prompt_ids / completion_ids / label, Phi-3's template). Only
            # TRL's KL pairing is kept, as TRL builds it: completions rotated by one within each micro-batch.
            if not self.calculate_KL:
                return dataset

            def add_kl_completion_ids(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                return examples

            return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)

    return PreferenceKTOTrainer


def build_trainer(model, tokenizer, args, data: MethodData, device: str, **kwargs):
    return build_reference_trainer(_trainer_class(), model, tokenizer, args, data, device, **kwargs)
