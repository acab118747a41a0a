"""The profiler on the tiny model: real training steps per configuration, each in a fresh process, OOM
recorded and survived, the same peak as `train` records, and the table / CSV / JSON / PNG it writes."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_phi3.run import profile as P
from qlora_phi3.config import recipes_dir
from qlora_phi3.errors import UserError
from qlora_phi3.memory.meter import LiveTensorTracker, PeakMemory

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process

TINY = str(recipes_dir() / "tiny_cpu.yaml")
SMALL = ["train.micro_batch_size=2", "lora.r=4"]


def test_tracker_counts_live_tensors_and_keeps_the_peak():
    with LiveTensorTracker() as tracker:
        start = tracker.current_bytes
        a = torch.empty(1024, 256)  # 1 MiB
        b = a.view(-1)[:10]  # a view: same storage, not counted twice
        assert tracker.current_bytes - start == 1024 * 256 * 4
        del a, b
        assert tracker.current_bytes == start
        assert tracker.peak_bytes - start == 1024 * 256 * 4


def test_peak_memory_reset_starts_a_new_peak():
    meter = PeakMemory("cpu")
    try:
        meter.reset()
        x = torch.ones(512, 512)
        del x
        first = meter.read().peak_allocated_gib
        meter.reset()
        second = meter.read().peak_allocated_gib
        assert first - second == pytest.approx(512 * 512 * 4 / 1024**3, rel=0.01)
        assert meter.read().process_rss_gib > 0
    finally:
        meter.close()


@pytest.mark.parametrize("grid,message", [(["lora.r"], "not key=v1,v2"), (["lora.r="], "no values"),
                                          (["lora.r=8", "lora.r=16"], "twice")])
def test_bad_grid_is_a_user_error(grid, message):
    with pytest.raises(UserError, match=message):
        P.parse_grid(grid)


def test_grid_is_the_cartesian_product_and_validates_keys():
    configs = P.grid_recipes(TINY, SMALL, ["lora.r=8,16", "data.max_seq_len=32,64,128"])
    assert len(configs) == 6
    assert {(r.lora.r, r.data.max_seq_len) for _, r in configs} == {(a, b) for a in (8, 16) for b in (32, 64, 128)}
    with pytest.raises(UserError, match="did you mean 'lora.r'"):
        P.grid_recipes(TINY, [], ["lora.rank=8"])


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A 2 x 2 grid on the tiny model with one configuration made to run out of memory (in its worker
    process: a sitecustomize on the worker's path replaces the loss with a CUDA OOM for lora.r=8, seq 32)."""
    hook = tmp_path_factory.mktemp("oom-hook")
    (hook / "sitecustomize.py").write_text(
        "import torch\n"
        "from qlora_phi3.run.methods import sft_trainer as trainer\n"
        "real = trainer.QLoRATrainer.compute_loss\n"
        "def compute_loss(self, model, inputs, *a, **k):\n"
        "    if self.model.peft_config['default'].r == 8 and inputs['input_ids'].shape[1] == 32:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)')\n"
        "    return real(self, model, inputs, *a, **k)\n"
        "trainer.QLoRATrainer.compute_loss = compute_loss\n")
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{hook}{os.pathsep}{old}"
    # The CPU workers fork from one server per test process, started by the first profile: one that an earlier test
    # file started holds no hook. Stop it, so this grid's server starts with the hook, and again after, so none leaks.
    _stop_forkserver()
    try:
        out = tmp_path_factory.mktemp("profile") / "out"
        configs = P.grid_recipes(TINY, SMALL, ["lora.r=8,16", "data.max_seq_len=32,96"])
        rows, meta = P.profile(configs, steps=1, warmup=1, budget_gib=1.0, recipe_name="tiny_cpu", quality_steps=4)
        paths = P.write_results(rows, meta, out)
    finally:
        os.environ["PYTHONPATH"] = old
        _stop_forkserver()
    return rows, meta, paths


def _stop_forkserver() -> None:
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # private, stable since Python 3.8: the next forkserver process starts afresh


def test_oom_is_recorded_and_the_grid_goes_on(profiled):
    rows, meta, _ = profiled
    assert [(r.lora_r, r.max_seq_len) for r in rows] == [(8, 32), (8, 96), (16, 32), (16, 96)]
    oom = rows[0]
    assert oom.status == "oom" and oom.peak_allocated_gib is None and oom.fits_budget is False
    assert "out of GPU memory" in oom.message
    for r in rows[1:]:
        assert r.status == "ok" and r.peak_allocated_gib > 0 and r.tokens_per_second > 0 and r.step_seconds > 0
        assert r.estimated_gib > 0 and r.fits_budget is True
    by = {(r.lora_r, r.max_seq_len): r.peak_allocated_gib for r in rows}
    assert by[(16, 96)] > by[(16, 32)]  # longer sequences, more memory, measured per configuration
    assert meta["process_per_configuration"] is True


def test_profiler_peak_is_the_peak_train_records(tmp_path):
    """One configuration, profiled and trained on the same conversations: the profiler's peak (measured steps
    after warm-up) and run.json's peak (the whole run) agree within 5% on the live-tensor measure, because both
    are the same training step. Both run in fresh processes, like every profiled configuration."""
    from qlora_phi3.config import dump_recipe
    from qlora_phi3.data.synthetic import write_full_length_conversations
    from qlora_phi3.model.load import load_tokenizer

    overrides = SMALL + ["data.max_seq_len=96", "train.grad_accum=2"]
    (point, recipe), = P.grid_recipes(TINY, overrides, [])
    rows, _ = P.profile([(point, recipe)], steps=2, warmup=1)
    data = write_full_length_conversations(tmp_path / "chats.jsonl", load_tokenizer(recipe.model), 40, 96)
    trained = P._measure_recipe(recipe, data, tmp_path / "run")
    trained.train.max_steps, trained.train.eval_steps = 3, 0
    dump_recipe(trained, tmp_path / "recipe.yaml")
    code = ("import sys; from qlora_phi3.config import load_recipe; from qlora_phi3.run.train import train; "
            "train(load_recipe(sys.argv[1], []), cpu_memory='tensors')")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "recipe.yaml")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["peak_memory"]["measure"] == "tensors"
    trained_peak, profiled_peak = run["peak_memory"]["peak_allocated_gib"], rows[0].peak_allocated_gib
    assert abs(profiled_peak - trained_peak) <= 0.05 * trained_peak, (profiled_peak, trained_peak)


def test_outputs_written(profiled):
    rows, meta, paths = profiled
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["oom", "ok", "ok", "ok"]
    assert table[1]["overrides"] == "lora.r=8 data.max_seq_len=96"
    data = json.loads(paths["json"].read_text())
    assert data["device"]["kind"] == "cpu" and len(data["rows"]) == 4 and data["budget_gib"] == 1.0
    assert "live tensor" in data["memory_measure"]
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not [p for p in paths["csv"].parent.iterdir() if p.name.startswith(".")]


def test_quality_steps_record_held_out_eval_loss_per_configuration(profiled):
    """--quality-steps: every configuration that ran trained 4 steps on the recipe's own data, and its held-out loss
    fell from the untrained one (the same for every rank of a sequence length: LoRA starts as the identity); the
    one that ran out of memory has none. The pick is the lowest loss among those that fit, and the plot has the
    quality panel beside memory and speed."""
    rows, meta, paths = profiled
    assert meta["quality_steps"] == 4
    assert rows[0].eval_loss is None
    for r in rows[1:]:
        assert r.eval_loss is not None and 0 < r.eval_loss < r.eval_loss_start, (r.overrides, r.eval_loss)
    assert rows[1].eval_loss_start == rows[3].eval_loss_start  # r=8 and r=16 at seq 96, before training
    choice, why = P.pick(rows, 1.0)
    assert choice.fits_budget and choice.eval_loss <= min(r.eval_loss for r in rows[1:]) * (1 + P.QUALITY_TIE)
    assert "eval loss" in why and meta["pick"] == {"overrides": choice.overrides, "why": why}
    with open(paths["csv"], newline="") as f:
        assert [t["eval_loss"] for t in csv.DictReader(f)][1:] == [str(r.eval_loss) for r in rows[1:]]


def test_table_fits_80_columns_and_shows_measured_estimated_and_fit(profiled):
    from rich.console import Console

    from qlora_phi3.cli.memory import profile_table

    rows, meta, _ = profiled
    console = Console(width=80, record=True)
    console.print(profile_table(rows, meta))
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "OOM" in text and "est." in text and "fits" in text and "yes" in text and "tiny_cpu" in text
    assert "eval" in text and "held-out loss after 4 steps" in " ".join(text.split())
    assert f"{rows[1].eval_loss:.4f}" in text
    assert "…" not in text  # nothing truncated
