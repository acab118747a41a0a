"""Guidance for small data (run/epochs.py): passes over the data counted as the Trainer counts steps, and a warning
with the override that fixes a run far too short or far too long for its data."""

import re

from qlora_phi3.config import load_recipe, resolve_recipe
from qlora_phi3.run.epochs import MAX_EPOCHS, MIN_RANDOM_BASE_STEPS, SMALL_DATA, coverage_warning, epoch_coverage


def _recipe(name: str, *overrides: str):
    return load_recipe(resolve_recipe(name), list(overrides))


def test_steps_per_epoch_count_partial_batches_processes_and_accumulation():
    recipe = _recipe("phi3_mini_4k_12gb", "train.micro_batch_size=2", "train.grad_accum=4", "train.max_steps=1000")
    cov = epoch_coverage(recipe, rows_per_epoch=125)  # 63 batches of 2 rows (the last one partial) -> 15 steps
    assert (cov.steps_per_epoch, cov.steps) == (15, 1000) and round(cov.epochs, 1) == 66.7
    assert epoch_coverage(recipe, rows_per_epoch=125, world_size=2).steps_per_epoch == 8  # 32 batches per process
    by_epochs = epoch_coverage(_recipe("phi3_mini_4k_12gb", "train.max_steps=-1", "train.epochs=2.5"),
                               rows_per_epoch=125)
    assert by_epochs.steps == 38 and round(by_epochs.epochs, 2) == 2.53
    assert epoch_coverage(recipe, rows_per_epoch=3).steps_per_epoch == 1  # fewer rows than one step: still one step


def _suggested_steps(warning: str) -> int:
    return int(re.search(r"train\.max_steps=(\d+)", warning).group(1))


def test_too_many_passes_on_a_pretrained_model_warns_with_three_passes():
    recipe = _recipe("phi3_mini_4k_12gb")  # 1,000 steps, made for a 200k-conversation set
    cov = epoch_coverage(recipe, rows_per_epoch=125)
    warning = coverage_warning(recipe, cov, n_train=500, unit="conversations")
    assert warning and "far too long" in warning and "500 train conversations" in warning
    assert _suggested_steps(warning) == 3 * cov.steps_per_epoch
    in_range = epoch_coverage(_recipe("phi3_mini_4k_12gb", "train.max_steps=45"), rows_per_epoch=125)
    assert in_range.epochs <= MAX_EPOCHS and coverage_warning(recipe, in_range, 500, "conversations") is None


def test_less_than_one_pass_warns_only_on_small_data():
    recipe = _recipe("phi3_mini_4k_12gb", "train.max_steps=5")
    cov = epoch_coverage(recipe, rows_per_epoch=2_000)  # 8 rows per step: 250 steps per pass, 2% of one
    warning = coverage_warning(recipe, cov, n_train=4_000, unit="conversations")
    assert warning and "far too short" in warning and "2% of one pass" in warning and _suggested_steps(warning) == 750
    assert coverage_warning(recipe, cov, n_train=SMALL_DATA + 1, unit="conversations") is None  # large data: normal


def test_the_embedded_random_model_needs_steps_not_passes():
    recipe = _recipe("tiny_cpu", "train.max_steps=40")
    cov = epoch_coverage(recipe, rows_per_epoch=13)  # 40 conversations: 13 packed rows, 3 steps per pass, 13 passes
    warning = coverage_warning(recipe, cov, n_train=38, unit="conversations")
    assert warning and f"train.max_steps={MIN_RANDOM_BASE_STEPS}" in warning and "random" in warning
    continued = coverage_warning(_recipe("tiny_cpu", "train.max_steps=40", "model.adapter=runs/tiny"), cov, 38,
                                 "conversations")  # a trained adapter continued: the passes count, as for Phi-3
    assert continued and "far too long" in continued and "random" not in continued
    default = _recipe("tiny_cpu")  # the recipe's own 300 steps: in range
    assert coverage_warning(default, epoch_coverage(default, rows_per_epoch=380), 1_140, "conversations") is None


def test_the_plan_names_what_each_method_trains_on(capsys):
    from types import SimpleNamespace

    from qlora_phi3.methods import METHODS
    from qlora_phi3.run.epochs import say_coverage

    words = {("tiny_cpu", "sft"): "conversations", ("tiny_cpu_dpo", "dpo"): "preference pairs",
             ("tiny_cpu_dpo", "kto"): "labelled answers", ("tiny_cpu_grpo", "grpo"): "prompts"}
    for (name, method), unit in words.items():
        recipe = _recipe(name, f"train.method={method}")
        data = SimpleNamespace(dataset={"train_samples": 80, "eval_samples": 20}, train=None, eval=None)
        say_coverage(recipe, epoch_coverage(recipe, rows_per_epoch=80), data)
        plan = " ".join(capsys.readouterr().out.split())
        assert f"80 train {unit}" in plan and f"20 held-out {unit}" in plan, (method, plan)
        assert ("packed rows" in plan) == (METHODS[method].packs and recipe.data.packing)
