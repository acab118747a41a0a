"""qlora-phi3 eval on the session's tiny run (300 steps of recipes/tiny_cpu.yaml): the fine-tune beats the base on
the shipped task, lm-eval's own files and the summary (also in run.json) are written, answers.jsonl holds both
models' answers side by side; a merged model scores what lm-eval's own CLI scores; train.eval_tasks runs the same
comparison when training ends."""

import contextlib
import io
import json
import shutil

import pytest

from qlora_phi3.cli import main

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # the session's tiny run (300 steps) and lm-eval on two models per test
LIMIT = 24  # documents of tiny_chat_facts (of 126) and held-out conversations: a few seconds per model on 2 cores


def _cli(*args) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([str(a) for a in args])
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    """A copy of the session's run: eval writes into its run.json."""
    dest = tmp_path_factory.mktemp("eval") / "tiny"
    shutil.copytree(tiny_run[1].output_dir, dest)
    return dest


@pytest.fixture(scope="module")
def evaluated(run_dir):
    # The answers are one short sentence; the untrained base never says <|end|>, so the cap bounds its time.
    code, printed = _cli("eval", run_dir, "--tasks", "tiny_chat_facts", "--data", "--limit", LIMIT,
                         "--max-new-tokens", 24)
    assert code == 0, printed
    summary = json.loads((run_dir / "eval" / "eval_summary.json").read_text())
    return summary, printed


def _row(summary, metric="acc"):
    return next(r for r in summary["rows"] if r["task"] == "tiny_chat_facts" and r["metric"] == metric)


def test_the_fine_tune_beats_the_base_on_the_shipped_task(evaluated):
    summary, printed = evaluated
    acc = _row(summary)
    assert acc["finetune"] >= 0.9 and acc["base"] <= 0.5, acc  # four choices: the random base is near chance
    assert acc["delta"] == pytest.approx(acc["finetune"] - acc["base"])
    assert 0 <= acc["finetune_stderr"] < 0.1 and acc["base_stderr"] > 0  # 0 when every answer is right
    assert summary["settings"]["chat_template"] is True and summary["settings"]["limit"] == LIMIT
    for word in ("tiny_chat_facts", "fine-tune", "delta", "stderr", "chat template on"):
        assert word in printed
    assert "adapter off" in summary["models"]["base"]["description"]


def test_each_models_results_file_is_lm_evals_own(evaluated):
    summary, _ = evaluated
    for label in ("base", "finetune"):
        path = summary["models"][label]["results_file"]
        assert path.split("/")[-1].startswith("results_") and f"/eval/{label}/" in path
        results = json.loads(open(path).read())
        assert {"results", "configs", "versions", "n-shot", "config"} <= set(results)
        assert results["results"]["tiny_chat_facts"]["acc,none"] == _row(summary)[label]
        assert results["config"]["batch_size"] == summary["settings"]["batch_size"]


def test_the_summary_lands_in_run_json(evaluated, run_dir):
    summary, _ = evaluated
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["eval"]["rows"] == summary["rows"]
    assert not list(run_dir.glob(".eval.partial*")) and not list(run_dir.glob(".run.json.*"))


def test_answers_to_held_out_chats_side_by_side(evaluated, run_dir):
    summary, printed = evaluated
    rows = [json.loads(line) for line in (run_dir / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == LIMIT and summary["answers"]["finetune"]["n"] == LIMIT
    assert {"origin", "prompt", "reference", "base", "finetune", "finetune_exact_match", "finetune_f1"} <= set(rows[0])
    fine, base = summary["answers"]["finetune"], summary["answers"]["base"]
    # The base is random weights: no answer right. The fine-tune has every fact's shape and most sums (measured: 68%
    # exact, F1 0.94 on the first 40).
    assert fine["exact_match"] >= base["exact_match"] + 0.5 and fine["token_f1"] >= 0.8 > base["token_f1"]
    assert "answers to held-out conversations" in printed and "exact match" in printed


def test_a_merged_model_scores_what_lm_evals_own_cli_scores(run_dir, tmp_path, monkeypatch):
    from lm_eval.__main__ import cli_evaluate

    from qlora_phi3.evaluate.tasks import SHIPPED_TASKS_DIR

    merged = tmp_path / "merged"
    assert _cli("merge", run_dir, "--out", merged, "--report-samples", "1")[0] == 0
    code, printed = _cli("eval", merged, "--tasks", "tiny_chat_facts", "--limit", 20, "--batch-size", 4,
                         "--out", tmp_path / "ours")
    assert code == 0, printed
    ours = json.loads(next((tmp_path / "ours" / "model").glob("results_*.json")).read_text())
    # lm-eval's command line, as users type it (`lm_eval run ...`), in this process
    monkeypatch.setattr("sys.argv", [
        "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={merged},dtype=auto", "--tasks",
        "tiny_chat_facts", "--include_path", str(SHIPPED_TASKS_DIR), "--limit", "20", "--batch_size", "4",
        "--device", "cpu", "--apply_chat_template", "--fewshot_as_multiturn",
        "--output_path", str(tmp_path / "theirs")])
    with contextlib.redirect_stdout(io.StringIO()):
        cli_evaluate()
    theirs = json.loads(next((tmp_path / "theirs").rglob("results_*.json")).read_text())
    for key in ("acc,none", "acc_stderr,none", "acc_norm,none"):
        assert ours["results"]["tiny_chat_facts"][key] == theirs["results"]["tiny_chat_facts"][key], key
    assert ours["results"]["tiny_chat_facts"]["acc,none"] >= 0.9


def test_merged_compares_the_16_bit_base_with_the_adapter_merged_into_it(run_dir, tmp_path):
    """--merged: the run's base in 16 bits, then the adapter merged into it (what `merge` writes), same settings."""
    code, printed = _cli("eval", run_dir, "--merged", "--tasks", "tiny_chat_facts", "--limit", 20, "--out",
                         tmp_path / "merged_eval")
    assert code == 0, printed
    summary = json.loads((tmp_path / "merged_eval" / "eval_summary.json").read_text())
    acc = _row(summary)
    assert acc["finetune"] >= 0.9 and acc["base"] <= 0.5, acc
    assert "merged" in summary["models"]["finetune"]["description"], summary["models"]
    assert "merged" not in summary["models"]["base"]["description"], summary["models"]


def test_train_eval_tasks_compares_when_training_ends(tmp_path):
    out = tmp_path / "run"
    code, printed = _cli("train", "train.max_steps=2", "train.eval_steps=0", "train.save_steps=0",
                         "train.eval_tasks=[tiny_chat_facts]", "train.eval_limit=12", "train.sample_prompts=0",
                         f"train.output_dir={out}")
    assert code == 0, printed
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["eval"]["tasks"] == ["tiny_chat_facts"]
    assert run["eval"]["settings"]["limit"] == 12 and "adapter off" in run["eval"]["models"]["base"]["description"]
    assert {r["metric"] for r in run["eval"]["rows"]} == {"acc", "acc_norm"}
    assert "fine-tune" in printed and (out / "eval" / "eval_summary.json").is_file()
