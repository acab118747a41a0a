"""The eval estimate: what evaluating a run of the 12 GB recipe needs, and the batch size chosen for a budget."""

import pytest

from qlora_phi3.config import load_recipe, recipes_dir
from qlora_phi3.errors import UserError
from qlora_phi3.memory.estimate import config_for_estimate, estimate
from qlora_phi3.memory.eval_memory import MAX_EVAL_BATCH, eval_estimate, pick_eval_batch
from qlora_phi3.units import GIB

PHI3 = recipes_dir() / "phi3_mini_4k_12gb.yaml"


@pytest.fixture(scope="module")
def phi3():
    recipe = load_recipe(PHI3, [])
    return recipe, config_for_estimate(recipe.model)


def test_a_12gb_run_evaluates_on_its_card_at_full_context(phi3):
    recipe, cfg = phi3
    rows, est = pick_eval_batch(recipe, cfg, "cuda", 4096, 12 * GIB)
    assert rows >= 1 and est.total_bytes <= 12 * GIB
    assert eval_estimate(recipe, cfg, "cuda", rows + 1, 4096).total_bytes > 12 * GIB  # the largest that fits
    # The same weights as training's estimate holds, less the adapter's gradients and optimizer states.
    trained = {t.name: t.n_bytes for t in estimate(recipe, cfg, "cuda").terms}
    evaluated = {t.name: t.n_bytes for t in est.terms}
    assert evaluated["4-bit base weights"] == trained["4-bit base weights"]
    assert "LoRA gradients (fp32)" not in evaluated


def test_shorter_rows_or_a_bigger_budget_never_give_a_smaller_batch(phi3):
    recipe, cfg = phi3
    batches = [pick_eval_batch(recipe, cfg, "cuda", seq, 12 * GIB)[0] for seq in (4096, 2048, 1024, 512)]
    assert batches == sorted(batches) and batches[-1] > batches[0]
    assert pick_eval_batch(recipe, cfg, "cuda", 2048, 24 * GIB)[0] >= pick_eval_batch(recipe, cfg, "cuda", 2048,
                                                                                        12 * GIB)[0]
    assert pick_eval_batch(recipe, cfg, "cuda", 16, 80 * GIB)[0] == MAX_EVAL_BATCH


def test_merged_16bit_weights_cost_more_than_4bit(phi3):
    recipe, cfg = phi3
    four = eval_estimate(recipe, cfg, "cuda", 1, 512)
    sixteen = eval_estimate(recipe, cfg, "cuda", 1, 512, merged=True)
    assert 7.0 < sum(t.gib for t in sixteen.terms if "weights" in t.name) < 7.8  # 3.8 B params x 2 B
    assert sixteen.total_bytes > four.total_bytes + 4 * GIB


def test_no_batch_fits_is_one_clear_error(phi3):
    recipe, cfg = phi3
    with pytest.raises(UserError, match="--max-length"):
        pick_eval_batch(recipe, cfg, "cuda", 4096, 2 * GIB)
