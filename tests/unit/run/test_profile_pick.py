"""The profile's closing pick: the lowest held-out eval loss among the configurations that fit the budget, near-ties
to the least memory; never one that does not fit; the fastest when quality was not measured. Rows are built here
(the pick reads only the table), so every rule is checked without training; tests/unit/run/test_profile.py checks
the same on a real profile."""

import pytest

from qlora_phi3.run.profile import QUALITY_TIE, ProfileRow, pick


def _row(r, peak, tok_s, eval_loss=None, fits=True, status="ok"):
    return ProfileRow(overrides={"lora.r": r}, lora_r=r, max_seq_len=64, micro_batch_size=1,
                      gradient_checkpointing="true", optimizer="paged_adamw_8bit", status=status,
                      peak_allocated_gib=peak, peak_reserved_gib=peak, tokens_per_second=tok_s, eval_loss=eval_loss,
                      fits_budget=fits)


def test_best_eval_loss_that_fits_the_budget_wins():
    rows = [_row(8, 1.0, 900, 2.10), _row(16, 1.5, 800, 1.90), _row(64, 3.0, 500, 1.50, fits=False)]
    choice, why = pick(rows, 2.0)
    assert choice.lora_r == 16  # r=64 learns best but does not fit
    assert "lowest held-out eval loss of the 2 that fit 2 GiB" in why and "1.9000" in why


def test_near_ties_go_to_the_least_memory():
    close = 1.90 * (1 + QUALITY_TIE / 2)
    rows = [_row(8, 1.0, 900, close), _row(16, 1.5, 800, 1.90), _row(32, 1.2, 700, 2.5)]
    choice, why = pick(rows, 4.0)
    assert choice.lora_r == 8 and "least memory of the 2" in why


def test_without_quality_the_fastest_that_fits_and_a_pointer_to_quality_steps():
    rows = [_row(8, 1.0, 900, fits=False), _row(16, 1.5, 800), _row(64, 3.0, 500)]
    choice, why = pick(rows, 3.5)
    assert choice.lora_r == 16 and "--quality-steps" in why


def test_nothing_to_pick_says_why():
    assert pick([_row(8, None, None, status="oom", fits=False)], 1.0)[0] is None
    choice, why = pick([_row(8, 2.0, 900, 1.5, fits=False)], 1.0)
    assert choice is None and "none of the 1 configurations that ran fits 1 GiB" in why


@pytest.mark.parametrize("budget", [None, 10.0])
def test_no_budget_picks_among_all_that_ran(budget):
    rows = [_row(8, 1.0, 900, 2.0, fits=None if budget is None else True), _row(16, 9.0, 800, 1.0,
                                                                              fits=None if budget is None else True)]
    choice, why = pick(rows, budget)
    assert choice.lora_r == 16 and ("no --budget" in why) == (budget is None)
