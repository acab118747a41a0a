"""ORPO: SFT and preference in one pass, no reference model (TRL's ORPOTrainer; :mod:`.pairwise` says what we
override and why). ``train.beta`` is ORPO's lambda, the weight of the odds-ratio term."""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.run.methods.base import common_arguments, eval_fields_of
from qlora_phi3.run.methods.preference import load_preference_data, preference_arguments

__all__ = ["build_trainer", "eval_fields", "load_data", "training_arguments"]

load_data = load_preference_data
eval_fields = eval_fields_of(__name__)


def training_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool):
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**{**common_arguments(recipe, output_dir, device, compute_dtype, measuring),
                         **preference_arguments(recipe), "max_length": recipe.data.max_seq_len})


def build_trainer(model, tokenizer, args, data, device: str, **kwargs):
    from trl.experimental.orpo import ORPOTrainer

    from qlora_phi3.run.methods.pairwise import build_pairwise_trainer

    return build_pairwise_trainer(ORPOTrainer, model, tokenizer, args, data, device, **kwargs)
