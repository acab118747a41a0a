"""The fit planner: the largest settings predicted to fit with the safety margin, written as a recipe that loads."""

import copy

import pytest

from qlora_phi3.config import load_recipe, recipes_dir
from qlora_phi3.errors import UserError
from qlora_phi3.memory.estimate import config_for_estimate, estimate
from qlora_phi3.memory.fit import SAFETY_MARGIN, SEQ_STEP, plan_fit, run_fit

PHI3 = recipes_dir() / "phi3_mini_4k_12gb.yaml"


def _setup():
    recipe = load_recipe(PHI3, [])
    return recipe, config_for_estimate(recipe.model)


@pytest.mark.parametrize("budget", [6.0, 8.0, 12.0, 24.0])
def test_plan_fits_and_is_the_largest(budget):
    recipe, cfg = _setup()
    plan = plan_fit(recipe, cfg, budget)
    usable = budget * (1 - SAFETY_MARGIN)
    p = plan.recipe
    assert plan.predicted_gib <= usable
    assert estimate(p, cfg).total_gib == pytest.approx(plan.predicted_gib)
    assert p.data.max_seq_len % SEQ_STEP == 0 and p.data.max_seq_len <= cfg.max_position_embeddings
    # maximal: one more micro-batch sample would not fit; nor would a longer sequence (at batch 1, checkpointed)
    bigger = copy.deepcopy(p)
    effective = recipe.train.micro_batch_size * recipe.train.grad_accum  # the recipe's, kept exactly
    bigger.train.micro_batch_size = next((m for m in range(p.train.micro_batch_size + 1, effective + 1)
                                          if effective % m == 0), effective + 1)
    assert bigger.train.micro_batch_size > effective or estimate(bigger, cfg).total_gib > usable
    if p.data.max_seq_len < cfg.max_position_embeddings:
        longer = copy.deepcopy(p)
        longer.data.max_seq_len += SEQ_STEP
        longer.train.micro_batch_size, longer.train.gradient_checkpointing = 1, True
        assert estimate(longer, cfg).total_gib > usable
        longer.train.tile_tokens = 2048  # nor with tiling
        assert estimate(longer, cfg).total_gib > usable
    # checkpointing only when needed
    if plan.checkpointing_needed:
        off = copy.deepcopy(p)
        off.train.micro_batch_size, off.train.gradient_checkpointing = 1, False
        assert estimate(off, cfg).total_gib > usable
    # exactly the effective batch the recipe asked for (2 x 4), never 3 x 3 = 9
    assert p.train.micro_batch_size * p.train.grad_accum == effective == 8


def test_bigger_budget_never_plans_less():
    recipe, cfg = _setup()
    small, large = plan_fit(recipe, cfg, 8), plan_fit(recipe, cfg, 24)
    assert (large.recipe.data.max_seq_len, large.recipe.train.micro_batch_size) >= \
           (small.recipe.data.max_seq_len, small.recipe.train.micro_batch_size)


def test_budget_too_small_is_a_clear_error():
    recipe, cfg = _setup()
    with pytest.raises(UserError, match="even data.max_seq_len=256"):
        plan_fit(recipe, cfg, 2.0)


def test_fit_writes_a_ready_self_documenting_recipe(tmp_path, capsys):
    from qlora_phi3.cli import main

    out = tmp_path / "phi3_fit_8gb.yaml"
    assert main(["fit", str(PHI3), "--budget", "8GiB", "--out", str(out)]) == 0
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# Fitted by qlora-phi3 for a 8 GiB budget")
    assert any("qlora-phi3 fit" in line and "--budget 8GiB" in line for line in lines[:5])
    assert "Predicted peak:" in text and "# fit:" in text
    shown = capsys.readouterr().out  # the command prints the report run_fit returns
    assert f"recipe written: {out}" in shown and "effective batch kept: 2 x 4 = 8 packed rows" in shown
    assert "data.max_seq_len: 2048 -> " in shown and "GiB of 8 GiB (safety margin 10%)" in shown
    report = run_fit(str(PHI3), [], "8GB", str(tmp_path / "again.yaml"))
    plan = report.plan
    assert report.recipe_path == tmp_path / "again.yaml" and report.recipe_path.is_file()
    loaded = load_recipe(out, [])  # the written recipe is valid and carries the planned values
    assert loaded.data.max_seq_len == plan.recipe.data.max_seq_len
    assert loaded.train.micro_batch_size == plan.recipe.train.micro_batch_size
    assert loaded.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"


def test_fit_never_plans_past_the_longest_conversation(tmp_path):
    """Data under 300 tokens must not get data.max_seq_len=4096 (it did): the data's lengths cap it."""
    from qlora_phi3.memory.fit import data_longest_tokens

    recipe = load_recipe(recipes_dir() / "tiny_cpu.yaml", [])
    longest, note = data_longest_tokens(recipe)
    assert 20 < longest < 300 and "longest conversation" in note
    cfg = config_for_estimate(recipe.model)
    plan = plan_fit(recipe, cfg, 24.0, longest_tokens=longest)
    assert plan.recipe.data.max_seq_len == SEQ_STEP * -(-longest // SEQ_STEP)
    assert plan_fit(recipe, cfg, 24.0).recipe.data.max_seq_len == cfg.max_position_embeddings  # no data: memory only
    assert any("longest conversation" in n for n in plan.notes)
    hub = load_recipe(PHI3, [])
    assert data_longest_tokens(hub)[0] is None  # a Hub dataset is not read (no download)


def test_fit_turns_tiling_on_only_when_it_buys_length():
    recipe = load_recipe(recipes_dir() / "phi3_mini_128k_12gb.yaml", ["train.tile_tokens=0"])
    cfg = config_for_estimate(recipe.model)
    plan = plan_fit(recipe, cfg, 12.0)
    assert plan.recipe.train.tile_tokens > 0 and plan.recipe.data.max_seq_len >= 32768
    untiled = copy.deepcopy(plan.recipe)
    untiled.train.tile_tokens = 0
    assert estimate(untiled, cfg).total_gib > plan.usable_gib
    short = plan_fit(load_recipe(PHI3, []), config_for_estimate(load_recipe(PHI3, []).model), 12.0)
    assert short.recipe.train.tile_tokens == 0  # 4k context fits untiled


def test_fit_counts_the_quadratic_attention_memory():
    """eager (scores) and sdpa with packing (the L x L mask) grow with the square of the row: fit plans shorter rows."""
    base = load_recipe(recipes_dir() / "phi3_mini_128k_12gb.yaml", [])
    cfg = config_for_estimate(base.model)
    flash = plan_fit(base, cfg, 12.0)
    sdpa_packed = plan_fit(load_recipe(recipes_dir() / "phi3_mini_128k_12gb.yaml",
                                       ["model.attn_implementation=sdpa"]), cfg, 12.0)
    eager = plan_fit(load_recipe(recipes_dir() / "phi3_mini_128k_12gb.yaml",
                                 ["model.attn_implementation=eager", "data.packing=false"]), cfg, 12.0)
    assert eager.recipe.data.max_seq_len < sdpa_packed.recipe.data.max_seq_len < flash.recipe.data.max_seq_len
    assert any("square" in n for n in sdpa_packed.notes + eager.notes)
