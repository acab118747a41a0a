"""SimPO: pairs, no reference model; the reward is the mean token log-prob scaled by ``train.beta``, with a target
margin ``train.simpo_gamma`` (TRL's CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0``: no SFT term, as in the
SimPO paper; :mod:`.pairwise` says what we override and why)."""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.run.methods.base import common_arguments, eval_fields_of
from qlora_phi3.run.methods.preference import load_preference_data, preference_arguments

__all__ = ["build_trainer", "eval_fields", "load_data", "training_arguments"]

load_data = load_preference_data
eval_fields = eval_fields_of(__name__)


def training_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool):
    from trl.experimental.cpo import CPOConfig

    return CPOConfig(**{**common_arguments(recipe, output_dir, device, compute_dtype, measuring),
                        **preference_arguments(recipe), "max_length": recipe.data.max_seq_len},
                     loss_type="simpo", simpo_gamma=recipe.train.simpo_gamma, cpo_alpha=0.0)


def build_trainer(model, tokenizer, args, data, device: str, **kwargs):
    from trl.experimental.cpo import CPOTrainer

    from qlora_phi3.run.methods.pairwise import build_pairwise_trainer

    return build_pairwise_trainer(CPOTrainer, model, tokenizer, args, data, device, **kwargs)
