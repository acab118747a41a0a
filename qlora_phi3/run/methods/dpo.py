"""DPO: pairs of a better and a worse answer against a frozen reference, with TRL's DPOTrainer.

The reference is the 4-bit base with the adapter off (or the frozen starting adapter): see
:mod:`qlora_phi3.run.methods.preference`. ``train.precompute_ref_log_probs`` scores every pair under it once
before training instead of once per step.
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
    from trl import DPOConfig

    return DPOConfig(**common_arguments(recipe, output_dir, device, compute_dtype, measuring),
                     **preference_arguments(recipe), loss_type=[recipe.train.dpo_loss],
                     precompute_ref_log_probs=recipe.train.precompute_ref_log_probs,
                     # robust DPO needs a flip probability; 0.1 is the Robust DPO paper's typical value
                     label_smoothing=0.1 if recipe.train.dpo_loss == "robust" else 0.0,
                     pad_to_multiple_of=None)


def _trainer_class():
    from trl import DPOTrainer

    class PreferenceDPOTrainer(reference_trainer_class(DPOTrainer)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Already tokenized by data.preference with Phi-3's template (prompt_ids / chosen_ids / rejected_ids);
            # TRL's tokenization would re-render the chat and truncate without counting.
            return dataset

    return PreferenceDPOTrainer


def build_trainer(model, tokenizer, args, data: MethodData, device: str, **kwargs):
    return build_reference_trainer(_trainer_class(), model, tokenizer, args, data, device, **kwargs)
