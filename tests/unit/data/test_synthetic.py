"""The bundled data sets are what data/synthetic.py generates (its regeneration entry point writes them): a change
to a generator that would change the shipped files, or files edited by hand, fail here."""

import json
from pathlib import Path

import pytest

from qlora_phi3.data import synthetic

ASSETS = Path(synthetic.__file__).resolve().parent.parent / "assets"


@pytest.mark.parametrize("name,generate", [("tiny_chat", synthetic.generate), ("tiny_prefs", synthetic.generate_pairs),
                                           ("tiny_kto", synthetic.generate_unpaired),
                                           ("tiny_sums", synthetic.generate_prompts)])
def test_the_shipped_sets_are_the_generators_output(name, generate):
    shipped = [json.loads(line) for line in (ASSETS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert generate() == shipped


def test_generated_records_are_distinct():
    for records in (synthetic.generate(300, seed=5), synthetic.generate_pairs(200, seed=5),
                    synthetic.generate_unpaired(200, seed=5)):
        keys = [json.dumps(r, sort_keys=True) for r in records]
        assert len(set(keys)) == len(keys) == len(records)


def test_answer_shape_rewards_the_chat_sets_shape_for_the_questions_numbers():
    prompt = [{"role": "user", "content": "What do 3 and 4 make?"}]
    answers = ["3 plus 4 is 7.", "3 plus 4 is 12.", "3 plus 4.", "4 plus 3 is 7.", "3 plus 4 is seven.",
               " 3 plus 4 is 7. "]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    assert synthetic.answer_shape([prompt] * len(answers), completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # Text prompts and completions as TRL hands them for plain-text data; a prompt without two numbers: None.
    texts = synthetic.answer_shape(["What do 10 and 2 make?", "Say hello."], ["10 plus 2 is 12.", "hello"])
    assert texts == [1.0, None]


def test_the_grpo_recipe_names_answer_shape_as_module_function_and_it_passes_the_pre_load_check():
    from qlora_phi3.config import load_recipe
    from qlora_phi3.run.rewards import load_rewards, try_rewards

    recipe = load_recipe("tiny_cpu_grpo")
    t = recipe.train
    rewards = load_rewards(t.rewards, t.reward_weights, t.numeric_tolerance, t.answer_column)
    assert [r.func.__name__ for r in rewards] == ["numeric_answer", "answer_shape"]
    record = synthetic.generate_prompts()[0]
    completions = [[{"role": "assistant", "content": "3 plus 5 is 8."}], [{"role": "assistant", "content": ""}]]
    try_rewards(rewards, [record["prompt"]] * 2, completions, [[1], []], {"answer": [record["answer"]] * 2}, "x:1")
    scores = [r.func(prompts=[record["prompt"]] * 2, completions=completions, completion_ids=[[1], []],
                     answer=[record["answer"]] * 2) for r in rewards]
    assert record["prompt"][0]["content"] == "What do 3 and 5 make?" and scores == [[1.0, 0.0], [1.0, 0.0]]
