"""The profiler on the tiny model: measured peaks per configuration, OOM recorded and survived, no memory
carried from one configuration to the next, and the table / CSV / JSON / PNG it writes."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from qlora_phi3.run import profile as P
from qlora_phi3.config import RECIPES_DIR
from qlora_phi3.errors import UserError
from qlora_phi3.memory.meter import LiveTensorTracker, PeakMemory

TINY = str(RECIPES_DIR / "tiny_cpu.yaml")
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
    """A 2 x 2 grid on the tiny model with one configuration made to run out of memory."""
    real_step = P._one_step

    def step_or_oom(model, optimizer, batch, recipe, *args):
        if recipe.lora.r == 8 and recipe.data.max_seq_len == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return real_step(model, optimizer, batch, recipe, *args)

    P._one_step = step_or_oom
    try:
        out = tmp_path_factory.mktemp("profile") / "out"
        rows, meta, paths = P.run_profile(TINY, SMALL, ["lora.r=8,16", "data.max_seq_len=32,96"], steps=1, warmup=1,
                                          budget="1GB", out_dir=str(out))
    finally:
        P._one_step = real_step
    return rows, meta, paths


def test_oom_is_recorded_and_the_grid_goes_on(profiled):
    rows, meta, _ = profiled
    assert [(r.lora_r, r.max_seq_len) for r in rows] == [(8, 32), (8, 96), (16, 32), (16, 96)]
    oom = rows[0]
    assert oom.status == "oom" and oom.peak_allocated_gib is None and oom.fits_budget is False
    assert "out of memory" in oom.message
    for r in rows[1:]:
        assert r.status == "ok" and r.peak_allocated_gib > 0 and r.tokens_per_second > 0 and r.step_seconds > 0
        assert r.estimated_gib > 0 and r.fits_budget is True


def test_no_memory_leaks_into_the_next_configuration(profiled):
    rows, meta, _ = profiled
    baselines = [r.baseline_gib for r in rows]
    assert max(baselines) - min(baselines) <= P.LEAK_TOLERANCE_GIB, baselines  # also right after the OOM
    assert meta["leaks"] == []
    by = {(r.lora_r, r.max_seq_len): r.peak_allocated_gib for r in rows}
    assert by[(16, 96)] > by[(16, 32)]  # longer sequences, more memory, measured per configuration


def test_leak_check_catches_a_leak(monkeypatch):
    kept = []
    real = P._run_configuration

    def leaky(base, recipe, row, *args):
        out = real(base, recipe, row, *args)
        kept.append(torch.ones(1024, 1024))  # 4 MiB left behind by this configuration
        return out

    monkeypatch.setattr(P, "_run_configuration", leaky)
    rows, meta = P.profile(P.grid_recipes(TINY, SMALL + ["data.max_seq_len=32"], ["lora.r=4,8"]), steps=1, warmup=1)
    assert len(meta["leaks"]) == 1 and "lora.r" in meta["leaks"][0]
    assert rows[1].baseline_gib - rows[0].baseline_gib == pytest.approx(4 / 1024, rel=0.05)


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
    assert not list(paths["csv"].parent.glob(".*tmp*"))


def test_table_shows_measured_estimated_and_fit(profiled):
    from rich.console import Console

    rows, meta, _ = profiled
    console = Console(width=200, record=True)
    console.print(P.render_table(rows, meta))
    text = console.export_text()
    assert "OOM" in text and "estimated GiB" in text and "fits 1 GiB" in text and "yes" in text


def test_bench_script_pieces():
    """bench/gpu_profile.py: the Phi-3-mini config it builds and the results page it writes (CPU-checkable)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu_profile

    cfg = gpu_profile.phi3_mini_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.max_position_embeddings) == (3072, 32, 32, 8192, 32064, 4096)
    assert {"lora.r=8,16,64", "data.max_seq_len=512,2048"} <= set(gpu_profile.GRID)


def test_bench_results_page(profiled):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu_profile

    rows, meta, _ = profiled
    md = gpu_profile.results_markdown(rows, meta, "bash bench/gpu_profile.sh", 12.0)
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table_rows) == len(rows)
    assert "| oom |" in table_rows[0] and f"{rows[1].estimated_gib:.2f}" in table_rows[1]
    assert "torch " + meta["versions"]["torch"] in md
