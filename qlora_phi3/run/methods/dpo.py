"""DPO: pairs of a better and a worse answer against a frozen reference, with TRL's DPOTrainer.

The reference is the 4-bit base with the adapter off (or the frozen starting adapter): see
:mod:`qlora_phi3.run.methods.preference`. ``train.precompute_ref_log_probs`` scores every pair under it once
before training instead of once per step.
"""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.run.methods.base import MethodData, TokenCounting, build_preference_trainer, common_arguments
from qlora_phi3.run.methods.preference import (drop_redundant_reference, eval_fields, load_preference_data,
                                               preference_arguments)

__all__ = ["NAME", "build_trainer", "eval_fields", "load_data", "training_arguments"]

NAME = "dpo"
load_data = load_preference_data


def training_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool):
    from trl import DPOConfig

    return DPOConfig(**common_arguments(recipe, output_dir, device, compute_dtype, measuring),
                     **preference_arguments(recipe), loss_type=[recipe.train.dpo_loss],
                     precompute_ref_log_probs=recipe.train.precompute_ref_log_probs,
                     # robust DPO needs a flip probability; 0.1 is the Robust DPO paper's typical value
                     label_smoothing=0.1 if recipe.train.dpo_loss == "robust" else 0.0,
                     pad_to_multiple_of=None)


def _trainer_class():
    from trl import DPOTrainer

    from qlora_phi3.run.card import ModelCardMixin
    from qlora_phi3.run.checkpoints import AtomicCheckpoints
    from qlora_phi3.run.internals import check_trainer_internals
    from qlora_phi3.run.logprobs import install_label_logprobs

    class PreferenceDPOTrainer(TokenCounting, ModelCardMixin, AtomicCheckpoints, DPOTrainer):
        def __init__(self, *args, loss_chunk_tokens: int = 256, **kwargs):
            check_trainer_internals(DPOTrainer)
            super().__init__(*args, **kwargs)
            if loss_chunk_tokens:  # 0 = TRL's fused head (4,096-position tiles), for comparison
                install_label_logprobs(self.model.get_base_model(), loss_chunk_tokens)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Already tokenized by data.preference with Phi-3's template (prompt_ids / chosen_ids / rejected_ids);
            # TRL's tokenization would re-render the chat and truncate without counting.
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._count_tokens(model, inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return PreferenceDPOTrainer


def build_trainer(model, tokenizer, args, data: MethodData, device: str, **kwargs):
    return build_preference_trainer(_trainer_class(), model, tokenizer, args, data, device, **kwargs,
                                    reference=lambda m: drop_redundant_reference(m, kwargs["recipe"]))
