"""The fit planner: the largest settings predicted to fit with the safety margin, written as a recipe that loads."""

import copy

import pytest

from qlora_phi3.config import recipes_dir, load_recipe
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
    bigger.train.micro_batch_size += 1
    assert bigger.train.micro_batch_size > 64 or estimate(bigger, cfg).total_gib > usable
    if p.data.max_seq_len < cfg.max_position_embeddings:
        longer = copy.deepcopy(p)
        longer.data.max_seq_len += SEQ_STEP
        longer.train.micro_batch_size, longer.train.gradient_checkpointing = 1, True
        assert estimate(longer, cfg).total_gib > usable
    # checkpointing only when needed
    if plan.checkpointing_needed:
        off = copy.deepcopy(p)
        off.train.micro_batch_size, off.train.gradient_checkpointing = 1, False
        assert estimate(off, cfg).total_gib > usable
    # same effective batch as the recipe asked for (2 x 8)
    assert abs(p.train.micro_batch_size * p.train.grad_accum - 16) <= p.train.micro_batch_size


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
    plan, _ = run_fit(str(PHI3), [], "8GB", str(tmp_path / "again.yaml"))
    loaded = load_recipe(out, [])  # the written recipe is valid and carries the planned values
    assert loaded.data.max_seq_len == plan.recipe.data.max_seq_len
    assert loaded.train.micro_batch_size == plan.recipe.train.micro_batch_size
    assert loaded.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert str(out) in capsys.readouterr().out
