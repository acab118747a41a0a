"""Trackers and sample answers: a tiny run with train.report_to=tensorboard writes event files that TensorBoard's
own reader loads, with the train and eval loss series and our metrics; samples.jsonl has one entry per prompt per
evaluation, and the default run's last answers are the trained ones; recipe and install errors come before loading."""

from __future__ import annotations

import json

import pytest

from qlora_phi3.config import load_recipe
from qlora_phi3.errors import UserError
from qlora_phi3.run.samples import SAMPLES_FILE

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process

STEPS, EVAL_STEPS = 4, 2


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    from qlora_phi3.run.train import train

    out = tmp_path_factory.mktemp("tb") / "run"
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("What is the capital of Zorvia?\n\nWhat is 2 plus 3?\n", encoding="utf-8")
    recipe = load_recipe("tiny_cpu", [f"train.output_dir={out}", f"train.max_steps={STEPS}",
                                      f"train.eval_steps={EVAL_STEPS}", "train.save_steps=0", "train.logging_steps=1",
                                      "data.max_samples=64", "train.report_to=tensorboard", "train.run_name=tb-test",
                                      f"train.sample_prompts={prompts}", "train.sample_max_new_tokens=8"])
    return train(recipe)


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    series: dict[str, list] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("tensors", []) + tags.get("scalars", []):
            try:
                events = mux.Scalars(run, tag)
                series.setdefault(tag, []).extend((e.step, e.value) for e in events)
            except KeyError:
                from tensorboard.util import tensor_util

                for e in mux.Tensors(run, tag):
                    value = tensor_util.make_ndarray(e.tensor_proto)
                    if value.dtype.kind == "f":
                        series.setdefault(tag, []).append((e.step, float(value)))
    return series


def _texts(logdir) -> dict[int, str]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.util import tensor_util

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    out = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("tensors", []):
            if tag.startswith("samples"):
                for e in mux.Tensors(run, tag):
                    out[e.step] = tensor_util.make_ndarray(e.tensor_proto).item().decode()
    return out


def test_tensorboard_event_files_hold_the_loss_series_and_our_metrics(tb_run):
    logdir = tb_run.output_dir / "tensorboard"
    assert logdir.is_dir() and not (tb_run.output_dir / "runs").exists()  # in the run dir, not transformers' default
    series = _scalars(logdir)
    train_loss = dict(series["train/loss"])
    assert sorted(train_loss) == list(range(1, STEPS + 1))
    assert train_loss[STEPS] == pytest.approx(tb_run.run["train_loss_end"], rel=1e-4)
    eval_loss = dict(series["eval/loss"])
    assert {0, EVAL_STEPS, STEPS} <= set(eval_loss)  # the step-0 eval loss reaches the tracker too
    assert eval_loss[0] == pytest.approx(tb_run.run["eval_loss_start"], rel=1e-4)
    assert eval_loss[STEPS] == pytest.approx(tb_run.run["eval_loss_end"], rel=1e-4)
    assert all(v > 0 for _, v in series["train/tokens_per_second"][1:])
    assert all(v > 0 for _, v in series["train/peak_memory_gib"])


def test_samples_file_has_one_entry_per_prompt_per_eval_and_reaches_tensorboard(tb_run):
    rows = [json.loads(line) for line in (tb_run.output_dir / SAMPLES_FILE).read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    assert steps == [0, EVAL_STEPS, STEPS]  # at start, in the loop, and the final eval at STEPS only once
    for step in steps:
        assert [r["prompt"] for r in rows if r["step"] == step] == ["What is the capital of Zorvia?", "What is 2 plus 3?"]
    assert all(r["origin"].endswith(("prompts.txt:1", "prompts.txt:3")) for r in rows)
    assert tb_run.run["sample_seconds"] > 0  # what the answers cost the run, in run.json
    texts = _texts(tb_run.output_dir / "tensorboard")
    assert set(texts) == set(steps)
    last = [r for r in rows if r["step"] == STEPS]
    assert all(r["answer"] in texts[STEPS] for r in last)


def test_default_run_last_samples_are_the_trained_answers(tiny_run):
    """The README's default run: 3 held-out eval prompts at every evaluation. At the last one the answers are the
    trained model's (what `chat` answers with the saved adapter), and mostly the training data's own; at step 0
    the untrained model knows none of them."""
    from qlora_phi3.out.chat import load_chat_model
    from qlora_phi3.model.generate import greedy_answer

    recipe, result = tiny_run
    rows = [json.loads(line) for line in (result.output_dir / SAMPLES_FILE).read_text().splitlines()]
    evals = sorted({r["step"] for r in rows})
    assert evals == [0, 100, 200, 300] and recipe.train.sample_prompts == 3
    assert all(sum(r["step"] == s for r in rows) == 3 for s in evals)
    last = [r for r in rows if r["step"] == 300]
    cm = load_chat_model(str(result.output_dir))
    for r in last:
        assert r["ended"] and r["answer"] == greedy_answer(cm.model, cm.tokenizer, r["messages"], 64)[0], r
    assert sum(r["answer"] == r["reference"] for r in last) >= 2, last
    assert not any(r["answer"] == r["reference"] or r["ended"] for r in rows if r["step"] == 0)


def test_unknown_tracker_is_a_recipe_error_naming_the_valid_ones():
    with pytest.raises(UserError) as e:
        load_recipe("tiny_cpu", ["train.report_to=[tensorboard,wandbb]"])
    assert "'wandbb'" in str(e.value) and "none, tensorboard, wandb, mlflow" in str(e.value)
    assert "command line" in str(e.value)


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_tracker_is_one_error_before_the_model_loads(tracker, tmp_path, monkeypatch):
    import importlib.util

    import qlora_phi3.model.load as load
    from qlora_phi3.run.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = load_recipe("tiny_cpu", [f"train.output_dir={tmp_path / 'r'}", f"train.report_to={tracker}"])
    with pytest.raises(UserError) as e:
        train(recipe)
    assert f"pip install 'qlora-phi3[{tracker}]'" in str(e.value)
    assert not (tmp_path / "r" / "run.json").exists()


def test_wandb_is_offline_and_in_the_run_dir_unless_set(tmp_path, monkeypatch):
    from qlora_phi3.run.tracking import prepare_trackers

    for var in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    recipe = load_recipe("tiny_cpu", ["train.report_to=[wandb,mlflow]"])
    prepare_trackers(recipe, tmp_path)
    import os

    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
    assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("WANDB_MODE", "online")
    prepare_trackers(recipe, tmp_path)
    assert os.environ["WANDB_MODE"] == "online"  # the user's choice stands


def test_sample_prompt_file_errors_name_the_line(tmp_path):
    from qlora_phi3.run.samples import sample_prompts

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n', encoding="utf-8")
    recipe = load_recipe("tiny_cpu", [f"train.sample_prompts={bad}"])
    with pytest.raises(UserError, match=r"p\.jsonl:2: the messages must end with a user turn"):
        sample_prompts(recipe, [])
    recipe = load_recipe("tiny_cpu", [f"train.sample_prompts={tmp_path / 'missing.txt'}"])
    with pytest.raises(UserError, match="no such file"):
        sample_prompts(recipe, [])


def test_resume_may_change_trackers_and_samples_but_not_the_variant(tmp_path, monkeypatch):
    """Trackers, run name and sample settings only observe the run; the LoRA variant and NEFTune make another run."""
    import qlora_phi3.run.rundir as rundir
    from qlora_phi3.config import dump_recipe

    out = tmp_path / "run"
    out.mkdir()
    dump_recipe(load_recipe("tiny_cpu", [f"train.output_dir={out}"]), out / "recipe.yaml")
    monkeypatch.setattr(rundir, "last_checkpoint", lambda path: out / "checkpoint-2")
    observe = ["train.report_to=[tensorboard]", "train.run_name=again", "train.sample_prompts=5",
               "train.sample_max_new_tokens=16"]
    plan = rundir.prepare_run_dir(load_recipe("tiny_cpu", [f"train.output_dir={out}", *observe]), True, False)
    assert set(plan.changes) == {"train.report_to", "train.run_name", "train.sample_prompts",
                                 "train.sample_max_new_tokens"}
    assert plan.recipe.train.report_to == ["tensorboard"] and plan.recipe.train.sample_prompts == 5
    for change in ("lora.use_dora=true", "lora.init=olora", "lora.use_rslora=true", "train.neftune_noise_alpha=5"):
        with pytest.raises(UserError, match=change.split("=")[0]):
            rundir.prepare_run_dir(load_recipe("tiny_cpu", [f"train.output_dir={out}", change]), True, False)
