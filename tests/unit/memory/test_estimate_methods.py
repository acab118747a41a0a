"""The estimator's method terms (rows, reference forward and KL rows in qlora_phi3/methods.py), from the shapes
alone: a pair is two rows, dpo and kto add a no-grad reference forward (not with precomputed reference log-probs), kto
its KL rows, a continued adapter its frozen copy; grpo's generation terms and its completion-only head; TRL's own head
at train.loss_chunk_tokens=0; and the CPU profile of DPO rows lands within 10% of the estimate."""

from __future__ import annotations

import pytest

from qlora_phi3.config import load_recipe, recipes_dir
from qlora_phi3.memory.estimate import KNOWN_SHAPES, estimate
from qlora_phi3.memory.fit import plan_fit

DPO = recipes_dir() / "phi3_mini_4k_8gb_dpo.yaml"
GRPO = recipes_dir() / "phi35_mini_12gb_grpo.yaml"


def _cfg():
    from transformers import Phi3Config

    return Phi3Config(**{**KNOWN_SHAPES["microsoft/Phi-3-mini-4k-instruct"], "tie_word_embeddings": False})


def _terms(recipe):
    return {t.name.split(" (")[0]: t.n_bytes for t in estimate(recipe, _cfg(), "cuda").terms}


def test_a_pair_is_two_rows_and_the_reference_forward_is_counted():
    dpo = load_recipe(DPO, ["train.micro_batch_size=1", "data.max_seq_len=2048"])
    sft = load_recipe(DPO, ["train.method=sft", "train.micro_batch_size=2", "data.max_seq_len=2048",
                            "data.packing=false"])
    t_dpo, t_sft = _terms(dpo), _terms(sft)
    assert t_dpo["saved activations"] == t_sft["saved activations"]  # 1 pair = 2 rows = SFT's 2 rows
    assert t_dpo["backward transients"] == t_sft["backward transients"]
    h, i = 3072, 8192
    assert t_dpo["no-grad forward"] >= 2 * 2048 * (4 * h + 8 * i) and "no-grad forward" not in t_sft
    assert estimate(dpo, _cfg(), "cuda").settings["rows_per_forward"] == 2
    precomputed = _terms(load_recipe(DPO, ["train.precompute_ref_log_probs=true"]))
    assert "no-grad forward" not in precomputed  # nothing left to forward without gradient


def test_reference_free_methods_have_no_reference_forward_and_kto_has_its_kl_rows():
    for method in ("orpo", "simpo"):
        assert "no-grad forward" not in _terms(load_recipe(DPO, [f"train.method={method}"]))
    kto = _terms(load_recipe(DPO, ["train.method=kto", "train.micro_batch_size=2"]))
    kto_pre = _terms(load_recipe(DPO, ["train.method=kto", "train.micro_batch_size=2",
                                       "train.precompute_ref_log_probs=true"]))
    # precomputed: only the 2 KL rows; otherwise also the 2 reference rows, each one layer's forward working set
    assert kto["no-grad forward"] - kto_pre["no-grad forward"] == 2 * 2048 * (4 * 3072 + 8 * 8192)


def test_a_continued_adapter_adds_its_frozen_copy(tmp_path):
    plain = _terms(load_recipe(DPO, []))
    continued = _terms(load_recipe(DPO, [f"model.adapter={tmp_path}"]))
    assert continued["reference adapter"] == plain["LoRA weights"]
    assert "reference adapter" not in plain


@pytest.mark.slow
def test_preference_rows_profile_within_10_percent_of_the_estimate(mini_phi3):
    """Real DPO / KTO / ORPO steps through the profiler (train's own path, full-length rows, CPU live tensors): each
    peak within 10% of the estimate; the label-only answer log-probs peak far below TRL's fused head."""
    from qlora_phi3.run.profile import grid_recipes, profile

    recipe = str(recipes_dir() / "tiny_cpu_dpo.yaml")
    configs = grid_recipes(recipe, ["data.max_seq_len=128", "train.micro_batch_size=4"],
                           ["train.gradient_checkpointing=true,false"])
    configs += grid_recipes(recipe, [f"model.name_or_path={mini_phi3}", "lora.dropout=0.05", "train.micro_batch_size=1",
                                     "data.max_seq_len=384"], ["train.loss_chunk_tokens=0,256"])
    configs += grid_recipes(recipe, [f"model.name_or_path={mini_phi3}", "train.micro_batch_size=2", "data.max_seq_len=256"],
                            ["train.method=kto,orpo"])
    rows, _ = profile(configs, steps=1, warmup=1)
    for row in rows:
        assert row.status == "ok", row
        assert abs(row.estimate_error_pct) <= 10, (row.overrides, row.peak_allocated_gib, row.estimated_gib)
    by_chunk = {r.overrides.get("train.loss_chunk_tokens"): r.peak_allocated_gib for r in rows
                if "train.loss_chunk_tokens" in r.overrides}
    assert by_chunk["256"] < 0.5 * by_chunk["0"]  # measured: 0.118 vs 0.736 GiB


# GRPO: generation's KV cache over the whole round (micro_batch_size x grad_accum completions of max_seq_len, every
# layer), its sampling logits, a reference forward only when beta > 0; and fit keeps a grpo recipe's row length and
# its generation round.

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


# The log-prob head: grpo scores only its completions, and train.loss_chunk_tokens=0 is TRL's tiled head (sft, dpo,
# kto, grpo) or the full logits (orpo, simpo).

def test_grpo_projects_only_the_completions_so_a_short_completion_costs_less_head():
    # 4 completions x 32 tokens = 128 scored positions < the 256-position chunk: the chunk holds only those.
    short = _terms(load_recipe(GRPO, ["train.micro_batch_size=4", "train.max_completion_len=32"]))
    full = _terms(load_recipe(GRPO, ["train.micro_batch_size=4", "train.max_completion_len=64"]))
    vocab, h = 32064, 3072
    assert full["logits and loss"] - short["logits and loss"] == 128 * vocab * 12 + 128 * h * 2
    # SFT scores every labelled token: the same rows are a whole chunk.
    sft = _terms(load_recipe(GRPO, ["train.method=sft", "train.beta=null", "train.micro_batch_size=4"]))
    assert sft["logits and loss"] > full["logits and loss"]


def test_trls_own_head_is_one_tile_of_at_most_4096_positions_by_32768_columns():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer import utils as trl_utils

    from qlora_phi3.memory import estimate as E

    # The tile the estimator assumes is the one the installed TRL uses.
    assert (E.TRL_HEAD_TILE_TOKENS, E.TRL_HEAD_TILE_VOCAB) == (TOKEN_CHUNK_SIZE,
                                                               trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    from transformers import Phi3Config

    cfg = Phi3Config(**KNOWN_SHAPES["microsoft/Phi-4-mini-instruct"])
    recipe = load_recipe(recipes_dir() / "phi4_mini_12gb_grpo.yaml", ["train.loss_chunk_tokens=0"])
    terms = {t.name.split(" (")[0]: t.n_bytes for t in estimate(recipe, cfg, "cuda").terms}
    # 8 completions x 1,024 scored positions on a GPU (Triton scores only those): a tile of 4,096 x 32,768, bf16.
    assert terms["logits and loss"] == 4096 * 32768 * 30  # not 8 x 1,536 x 200,064 x 30 (68.7 GiB)
    # ORPO's trainer takes the full logits: every position by the whole vocabulary.
    orpo = load_recipe(DPO, ["train.method=orpo", "train.loss_chunk_tokens=0", "train.micro_batch_size=1",
                             "data.max_seq_len=2048"])
    assert _terms(orpo)["logits and loss"] == 2 * 2048 * 32064 * 30
