"""GRPO's rewards: the built-ins score what they say, and a reward that TRL could not use is refused before the
model loads with one error naming it, leaving nothing behind."""

import math
import sys

import pytest

from qlora_phi3.errors import UserError
from qlora_phi3.run.rewards import final_answer, load_rewards, resolve_reward, try_rewards


def _chat(text):
    return [{"role": "assistant", "content": text}]


def test_think_format_wants_a_closed_block_then_an_answer():
    f = resolve_reward("think_format")
    got = f(prompts=[""] * 4, completions=["<think>add them</think>\n7", "<think>add them</think>", "7",
                                          _chat("<think>x</think> The answer is 7.")])
    assert got == [1.0, 0.0, 0.0, 1.0]


def test_exact_and_numeric_answers_read_the_answer_after_the_reasoning():
    assert final_answer("<think>maybe 6</think> 7") == "7"
    exact = resolve_reward("exact_answer")
    assert exact(prompts=[""] * 3, completions=["<think>6?</think> Paris.", "paris", "Lyon"],
                 answer=["Paris", "Paris", "Paris"]) == [1.0, 1.0, 0.0]
    assert exact(prompts=[""] * 3, completions=[r"So \boxed{\frac{1}{3}}.", r"\frac{1}{3}", r"\boxed{3}"],
                 answer=[r"\frac{1}{3}", r"\boxed{\frac{1}{3}}", r"\frac{1}{3}"]) == [1.0, 1.0, 0.0]
    numeric = resolve_reward("numeric_answer", tolerance=0.01)
    got = numeric(prompts=[""] * 5, completions=["<think>6</think> 3 plus 4 is 7.", "it is 1,000.5", "7.1", "none",
                                                _chat("7")], answer=["7", "1000.5", "7", "7", "n/a"])
    assert got == [1.0, 1.0, 0.0, 0.0, None]  # 7.1 is outside 1% of 7; no number in the answer column: None


@pytest.mark.parametrize("answer, completions, expected", [
    # Fractions are values: the last digit of 1/3 is not its answer (DeepMath-103K's 'solution' column is LaTeX).
    (r"\frac{1}{3}", [r"\boxed{\frac{1}{3}}", "It is 1/3.", "3", r"\dfrac{2}{6}"], [1.0, 1.0, 0.0, 1.0]),
    (r"$-\dfrac{3}{4}$", ["-3/4", "3/4", r"-\frac{3}{4}"], [1.0, 0.0, 1.0]),
    (r"\boxed{12}", [r"<think>11?</think> So \boxed{12}, not 13.", "13"], [1.0, 0.0]),  # the boxed answer counts
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", ["72", "24"], [1.0, 0.0]),  # GSM8K: after '####'
    # Not one number: no reward rather than a wrong one.
    (r"\sqrt{2}", ["2", "1.414"], [None, None]),
    ("[0, 1)", ["1", "0"], [None, None]),
    (r"2\pi", ["2"], [None]),
])
def test_numeric_answer_reads_fractions_and_boxed_answers_and_skips_expressions(answer, completions, expected):
    numeric = resolve_reward("numeric_answer", tolerance=1e-6)
    assert numeric(prompts=[""] * len(completions), completions=completions,
                   answer=[answer] * len(completions)) == expected


def _write(tmp_path, body: str):
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def _try(rewards, n=2):
    try_rewards(rewards, ["q"] * n, ["a"] * n, [[1]] * n, {"answer": ["7"] * n}, "data.jsonl:1")


def test_a_reward_file_in_trls_signature_loads_and_leaves_no_pycache(tmp_path):
    path = _write(tmp_path, "def score(prompts, completions, completion_ids, answer, **kwargs):\n"
                            "    return [float(c == a) for c, a in zip(completions, answer)]\n")
    rewards = load_rewards([f"{path}:score", "think_format"], [2.0, 0.5])
    _try(rewards)
    assert [r.weight for r in rewards] == [2.0, 0.5]
    assert not (tmp_path / "__pycache__").exists()


@pytest.mark.parametrize("body,spec,message", [
    ("def score(prompts, completions, **kw):\n    return [0.0]\n", "FILE:score", "returned 1 rewards for 2"),
    ("def score(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n", "FILE:score",
     "returned nan"),
    ("def score(prompts, completions, **kw):\n    return 1.0\n", "FILE:score", "returned float"),
    ("def score(prompts, completions, **kw):\n    return ['good'] * len(completions)\n", "FILE:score", "'good'"),
    ("def score(prompts, completions):\n    return [0.0] * len(completions)\n", "FILE:score", "end its parameters "
                                                                                            "with \\*\\*kwargs"),
    ("def score(prompts, completions, **kw):\n    raise KeyError('solution')\n", "FILE:score", "raised KeyError"),
    ("def other(**kw):\n    return []\n", "FILE:score", "has no function 'score' \\(it has: other\\)"),
    ("import not_a_module_anywhere\n", "FILE:score", "importing .* failed: ModuleNotFoundError"),
])
def test_a_reward_trl_could_not_use_is_one_error_naming_it(tmp_path, body, spec, message):
    path = _write(tmp_path, body)
    spec = spec.replace("FILE", str(path))
    before = set(sys.modules)
    with pytest.raises(UserError, match=message) as e:
        _try(load_rewards([spec], None))
    assert f"{spec!r}" in str(e.value) and "\n" not in str(e.value)
    assert not [m for m in set(sys.modules) - before if m.startswith("qlora_phi3_reward_") and "import" in body]
    assert not (tmp_path / "__pycache__").exists()


@pytest.mark.parametrize("spec,message", [
    ("no_such_pkg.rewards:score", "cannot import module 'no_such_pkg.rewards'"),
    ("missing/file.py:score", "no file missing/file.py"),
    ("numeric", "neither a built-in"),
    ("math:not_there", "has no function 'not_there'"),
])
def test_missing_modules_files_and_functions_are_named(spec, message):
    with pytest.raises(UserError, match=message):
        load_rewards([spec], None)


def test_a_reward_missing_the_column_it_needs_says_which_columns_there_are():
    with pytest.raises(UserError, match=r"'exact_answer'.*data column 'answer' \(train.answer_column\).*\['solution'\]"):
        try_rewards(load_rewards(["exact_answer"], None), ["q"], ["a"], [[1]], {"solution": ["7"]}, "x.jsonl:3")


def test_module_function_specs_import_from_the_environment():
    (reward,) = load_rewards(["math:isfinite"], None)
    assert reward.func is math.isfinite


def test_the_answer_column_is_the_recipes():
    (reward,) = load_rewards(["numeric_answer"], None, column="solution")
    try_rewards([reward], ["q"], ["7"], [[1]], {"solution": ["7"]}, "x.jsonl:3")
    assert reward.func(prompts=["q"], completions=["is 7"], solution=["7"]) == [1.0]
    assert reward.func.__name__ == "numeric_answer"  # TRL logs it under this name
