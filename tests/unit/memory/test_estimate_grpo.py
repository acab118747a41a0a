"""The estimator's GRPO terms, from the shapes alone: generation's KV cache over the whole round (micro_batch_size x
grad_accum completions of max_seq_len, every layer), its sampling logits, a reference forward only when beta > 0;
and fit keeps a grpo recipe's row length and its generation round."""

from __future__ import annotations

from qlora_phi3.config import load_recipe, recipes_dir
from qlora_phi3.memory.estimate import KNOWN_SHAPES, estimate
from qlora_phi3.memory.fit import plan_fit

GRPO = recipes_dir() / "phi35_mini_12gb_grpo.yaml"


def _cfg():
    from transformers import Phi3Config

    return Phi3Config(**{**KNOWN_SHAPES["microsoft/Phi-3-mini-4k-instruct"], "tie_word_embeddings": False})


def _terms(recipe):
    return {t.name.split(" (")[0]: t.n_bytes for t in estimate(recipe, _cfg(), "cuda").terms}


def test_generation_kv_cache_counts_every_completion_of_the_round():
    small = _terms(load_recipe(GRPO, ["train.micro_batch_size=4", "train.grad_accum=2"]))
    round_x2 = _terms(load_recipe(GRPO, ["train.micro_batch_size=4", "train.grad_accum=4"]))
    # Phi-3-mini: 32 layers (+1 while the cache grows), 32 KV heads x 96, K and V, bf16
    assert small["generation KV cache"] == 8 * 1024 * 33 * 2 * 3072 * 2
    assert round_x2["generation KV cache"] == 2 * small["generation KV cache"]
    assert round_x2["saved activations"] == small["saved activations"]  # the training forward is micro_batch_size rows
    assert small["sampling logits"] == 8 * 32064 * (2 + 8)
    assert "generation KV cache" not in _terms(load_recipe(GRPO, ["train.method=sft", "train.beta=null"]))


def test_the_reference_forward_runs_only_with_a_kl_term():
    assert "no-grad forward" not in _terms(load_recipe(GRPO, ["train.beta=0"]))
    assert "no-grad forward" in _terms(load_recipe(GRPO, ["train.beta=0.04"]))


def test_fit_keeps_the_row_length_and_the_generation_round():
    recipe = load_recipe(GRPO)
    plan = plan_fit(recipe, _cfg(), 12.0)
    t = plan.recipe.train
    assert plan.recipe.data.max_seq_len == recipe.data.max_seq_len
    assert t.micro_batch_size * t.grad_accum == recipe.train.micro_batch_size * recipe.train.grad_accum
    assert plan.predicted_gib <= plan.usable_gib
