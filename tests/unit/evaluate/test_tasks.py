"""qlora-phi3 eval's checks, each one clear line before any model loads: an unknown task, a task YAML with an
error, a Hub task offline (within seconds, naming --include-path), a run directory without an adapter, a --data
file with a broken line; and the shipped task's documents."""

import json
import time

import pytest

from qlora_phi3.data.synthetic import answer_for
from qlora_phi3.evaluate.facts import N_CHOICES, documents

TINY = "embedded:tiny-phi3"
# Tests that look past the shipped task need the map of lm-eval's own ~14,000 task files, built once per machine by
# lm-eval's own index (half a minute on 2 cores, more when busy): the full tier's.
_INDEX = pytest.mark.slow


def _one_error_line(res) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return " ".join(res.stderr.split())  # rich may wrap the one line


def test_the_shipped_task_asks_every_fact_of_the_tiny_chat_set():
    docs = documents()
    assert len(docs) == 16 + 10 + 100 and docs == documents()  # capitals, colours, sums; the same every time
    for doc in docs:
        assert len(set(doc["choices"])) == N_CHOICES
        assert doc["choices"][doc["answer"]] == answer_for(doc["question"])
    assert len({d["answer"] for d in docs}) == N_CHOICES  # the right answer is not always in one place


@_INDEX
def test_an_unknown_task_is_refused_with_the_way_to_add_one(qlora):
    pytest.importorskip("lm_eval")
    text = _one_error_line(qlora("eval", TINY, "--tasks", "tiny_chat_fact"))
    assert "tiny_chat_fact: no such task" in text and "--include-path" in text
    assert "Did you mean tiny_chat_facts" in text


def test_a_task_yaml_that_does_not_parse_names_its_file_and_line(qlora, tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\ndoc_to_text: [unclosed\n")
    text = _one_error_line(qlora("eval", TINY, "--tasks", "mine", "--include-path", tmp_path))
    assert f"{tmp_path / 'mine.yaml'}:" in text and "invalid task YAML" in text


def test_a_task_lm_eval_cannot_build_names_the_task_and_its_yaml(qlora, tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"q": "2+2?", "a": "4"}) + "\n")
    (tmp_path / "qa.yaml").write_text(f"task: my_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                      f"    test: {data}\ntest_split: test\noutput_type: guess_the_answer\n"
                                      "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    text = _one_error_line(qlora("eval", TINY, "--tasks", "my_qa", "--include-path", tmp_path))
    assert "--tasks my_qa" in text and str(tmp_path / "qa.yaml") in text and "output_type" in text


@_INDEX
def test_a_hub_task_offline_fails_in_seconds_naming_include_path(qlora, monkeypatch):
    """The Hub unreachable (a closed local port stands in for it) and the user's environment not offline: the
    probe takes the process offline, so the task's data set fails at once instead of after retries."""
    pytest.importorskip("lm_eval")
    import qlora_phi3.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_reachable", None)
    t0 = time.perf_counter()
    text = _one_error_line(qlora("eval", TINY, "--tasks", "arc_easy"))
    seconds = time.perf_counter() - t0
    assert "--tasks arc_easy" in text and "unreachable" in text and "--include-path" in text
    assert seconds < 20, f"the offline refusal took {seconds:.1f} s"  # indexing lm-eval's tasks is most of it


def test_a_run_without_an_adapter_is_refused(qlora, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running"}))
    text = _one_error_line(qlora("eval", run, "--tasks", "tiny_chat_facts"))
    assert "no finished adapter" in text


def test_a_data_file_with_a_broken_line_names_it(qlora, tmp_path):
    path = tmp_path / "held_out.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]})
    path.write_text(f"{good}\n{{\"messages\": [\n")
    text = _one_error_line(qlora("eval", TINY, "--data", path))
    assert f"{path}:2" in text


def test_nothing_to_evaluate_is_refused(qlora):
    assert "give --tasks" in _one_error_line(qlora("eval", TINY))


@_INDEX
def test_an_unknown_train_eval_task_stops_training_before_it_starts(qlora, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "run"
    text = _one_error_line(qlora("train", "train.eval_tasks=[no_such_task]", f"train.output_dir={out}"))
    assert "no_such_task: no such task" in text and not out.exists()
