"""KTO: answers labelled desirable or not, against a frozen reference (TRL's KTOTrainer).

The reference is the 4-bit base with the adapter off, as for DPO (:mod:`qlora_phi3.run.methods.preference`).
KTO's KL term scores each prompt with another record's answer from the same micro-batch: one more batch of rows
through the policy (no gradient) and the reference, so ``train.micro_batch_size`` must be 2 or more.
"""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.run.methods.base import MethodData, TokenCounting, build_preference_trainer, common_arguments
from qlora_phi3.run.methods.preference import (drop_redundant_reference, eval_fields, load_preference_data,
                                               preference_arguments)

__all__ = ["NAME", "build_trainer", "eval_fields", "load_data", "training_arguments"]

NAME = "kto"
load_data = load_preference_data


def training_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool):
    from trl import KTOConfig

    t = recipe.train
    return KTOConfig(**common_arguments(recipe, output_dir, device, compute_dtype, measuring),
                     **preference_arguments(recipe), desirable_weight=t.kto_desirable_weight,
                     undesirable_weight=t.kto_undesirable_weight, precompute_ref_log_probs=t.precompute_ref_log_probs)


def _trainer_class():
    from trl import KTOTrainer

    from qlora_phi3.run.card import ModelCardMixin
    from qlora_phi3.run.checkpoints import AtomicCheckpoints
    from qlora_phi3.run.internals import check_trainer_internals
    from qlora_phi3.run.logprobs import install_label_logprobs

    class PreferenceKTOTrainer(TokenCounting, ModelCardMixin, AtomicCheckpoints, KTOTrainer):
        _ROW_KEYS = ("",)  # the KL rows run without gradient: counted as compute, not as training tokens

        def __init__(self, *args, loss_chunk_tokens: int = 256, **kwargs):
            check_trainer_internals(KTOTrainer)
            super().__init__(*args, **kwargs)
            if loss_chunk_tokens:
                install_label_logprobs(self.model.get_base_model(), loss_chunk_tokens)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Already tokenized by data.preference (prompt_ids / completion_ids / label, Phi-3's template). Only
            # TRL's KL pairing is kept, as TRL builds it: completions rotated by one within each micro-batch.
            if not self.calculate_KL:
                return dataset

            def add_kl_completion_ids(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                return examples

            return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._count_tokens(model, inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return PreferenceKTOTrainer


def build_trainer(model, tokenizer, args, data: MethodData, device: str, **kwargs):
    return build_preference_trainer(_trainer_class(), model, tokenizer, args, data, device, **kwargs,
                                    reference=lambda m: drop_redundant_reference(m, kwargs["recipe"]))
