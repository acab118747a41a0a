"""`qlora-phi3 profile` for grpo: prompt records sized to the configuration (the prompt fills what the completion
leaves of data.max_seq_len), generation as in training with every completion run to train.max_completion_len (the
worst case), peak memory and speed per configuration; --quality-steps refused in one line (grpo has no held-out
loss to rank by)."""

import json

import pytest

from qlora_phi3.config import recipes_dir
from qlora_phi3.data.prompts import PromptRecord, prompt_token_ids
from qlora_phi3.data.synthetic import write_full_length_prompts
from qlora_phi3.errors import UserError
from qlora_phi3.model.load import load_tokenizer
from qlora_phi3.run import profile as P

GRPO = str(recipes_dir() / "tiny_cpu_grpo.yaml")
# The tiny random base alone (no SFT run needed), one prompt's group per step; beta 0: no reference forward.
BASE = ["model.adapter=null", "train.beta=0", "train.micro_batch_size=8", "train.grad_accum=1",
        "data.max_seq_len=48"]


@pytest.fixture(scope="module")
def tokenizer():
    (_, recipe), = P.grid_recipes(GRPO, BASE, [])
    return load_tokenizer(recipe.model)


def test_profile_prompts_fill_the_prompt_limit_and_end_with_their_question(tmp_path, tokenizer):
    path = write_full_length_prompts(tmp_path / "p.jsonl", tokenizer, 5, 40)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 5 and len({r["prompt"][0]["content"] for r in records}) == 5
    for r in records:
        n = len(prompt_token_ids(tokenizer, PromptRecord(r["prompt"], {}, "")))
        assert 37 <= n <= 40  # never over the limit (it would be dropped), at most a word's tokens under it
        a, b = (int(x) for x in r["prompt"][0]["content"].rstrip("?").split("What is ")[1].split(" plus "))
        assert r["answer"] == str(a + b)  # the reward column matches the question
    with pytest.raises(ValueError, match="cannot hold the question"):
        write_full_length_prompts(tmp_path / "q.jsonl", tokenizer, 1, 5)


def test_profile_data_for_grpo_is_prompts_at_the_configurations_limit(tmp_path, tokenizer):
    (_, recipe), = P.grid_recipes(GRPO, BASE + ["train.max_completion_len=16"], [])
    path = P._write_data(tmp_path / "d.jsonl", recipe, 3)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"prompt", "answer"}
    assert 29 <= len(prompt_token_ids(tokenizer, PromptRecord(first["prompt"], {}, ""))) <= 48 - 16
    # configurations with the same prompt limit share a file; another completion length needs another
    (_, other), = P.grid_recipes(GRPO, BASE + ["train.max_completion_len=8"], [])
    assert P._data_key(recipe) != P._data_key(other)
    assert P._conversations_needed(recipe, steps=2, warmup=1) == 3 + 2  # 3 steps x 8 completions = 3 prompts


def test_profile_scores_grpo_with_a_reward_the_synthetic_prompts_can_feed(tmp_path):
    """The 12 GB recipe's rewards read a `solution` column (and a user's reward file may read any column): the
    measured run scores the synthetic prompts with numeric_answer on their `answer` column instead."""
    (_, recipe), = P.grid_recipes("phi4_mini_12gb_grpo", [], [])
    assert recipe.train.answer_column == "solution"
    measured = P._measure_recipe(recipe, tmp_path / "d.jsonl", tmp_path / "run")
    assert (measured.train.rewards, measured.train.answer_column) == (["numeric_answer"], "answer")
    assert measured.train.reward_weights is None and recipe.train.rewards == ["think_format", "numeric_answer"]


def test_quality_steps_are_refused_for_grpo_in_one_line_before_any_work(qlora, tmp_path):
    res = qlora("profile", GRPO, *BASE, "--grid", "lora.r=4,8", "--quality-steps", "2", "--out", tmp_path / "out")
    assert res.returncode != 0 and "Traceback" not in res.stderr + res.stdout
    said = (res.stdout + res.stderr).strip()
    assert "--quality-steps does not apply to train.method=grpo" in said and "held-out eval loss" in said
    assert "profiling" not in said and not (tmp_path / "out").exists()  # refused before the plan, nothing written
    with pytest.raises(UserError, match="does not apply to train.method=grpo"):  # the library call says the same
        P.profile(P.grid_recipes(GRPO, BASE, []), steps=1, warmup=1, quality_steps=2)


@pytest.mark.slow  # two configurations, each a forked process training 2 GRPO steps of the tiny model (~10 s)
def test_profile_grpo_measures_full_length_rounds_per_configuration():
    configs = P.grid_recipes(GRPO, BASE + ["train.max_completion_len=16"], ["data.max_seq_len=40,72"])
    try:
        rows, meta = P.profile(configs, steps=1, warmup=1, recipe_name="tiny_cpu_grpo")
    finally:
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # the server holds torch; leave none behind for other test files
    assert [r.status for r in rows] == ["ok", "ok"], [r.message for r in rows]
    for r in rows:
        assert r.peak_allocated_gib > 0 and r.tokens_per_second > 0 and r.estimated_gib > 0 and r.step_seconds > 0
        # The measured step is one round of 8 completions, each its prompt (filled to max_seq_len - 16, a word's
        # tokens short at most) and a completion run to the full 16 tokens: the configuration's worst case.
        tokens = r.tokens_per_second * r.step_seconds  # both rounded in the table: 1% slack
        assert 8 * (r.max_seq_len - 4) <= tokens * 1.01 and tokens <= 8 * r.max_seq_len * 1.01, (tokens, r)
    assert rows[1].peak_allocated_gib > rows[0].peak_allocated_gib  # longer rows, more memory, each measured
    assert meta["steps"] == 1 and meta["quality_steps"] == 0


def test_table_shows_other_grid_axes_such_as_the_completion_length():
    from rich.console import Console

    from qlora_phi3.cli.memory import profile_table

    rows = [P.ProfileRow(overrides={"data.max_seq_len": seq, "train.max_completion_len": c}, lora_r=16,
                         max_seq_len=seq, micro_batch_size=8, gradient_checkpointing="true",
                         optimizer="paged_adamw_8bit", peak_allocated_gib=0.06, peak_reserved_gib=0.06,
                         estimated_gib=0.1, tokens_per_second=500.0) for seq in (40, 72) for c in (8, 16)]
    console = Console(width=80, record=True)
    console.print(profile_table(rows, {"recipe_name": "tiny_cpu_grpo", "device": {"name": "cpu", "kind": "cpu"}}))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "status" in line).split()
    assert header[:3] == ["seq", "compl", "status"]
    assert [line.split()[:2] for line in lines if line.split()[:1] in (["40"], ["72"])] == \
        [["40", "8"], ["40", "16"], ["72", "8"], ["72", "16"]]
