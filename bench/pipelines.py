"""What the ours-versus-plain-TRL benchmarks share (bench/dpo_compare.py, bench/grpo_compare.py): the command line
of a two-pipeline comparison, each pipeline run in its own process (so neither sees the other's allocator caches or
imports), and the CPU facts written beside the figures."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

__all__ = ["add_pipeline_args", "compare_summary", "cpu_facts", "note_rss_at_meter_reset", "run_pipelines",
           "train_reference", "write_compare"]


def add_pipeline_args(p: argparse.ArgumentParser, name: str) -> None:
    """--chunk, --workdir, --write, --reuse-reference and the worker's hidden arguments."""
    p.add_argument("--chunk", type=int, default=256, help="ours: train.loss_chunk_tokens (0 = TRL's fused head)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), f"qlora-phi3-{name}-compare"))
    p.add_argument("--write", action="store_true", help=f"write bench/results/cpu_{name}_compare.{{md,json}}")
    p.add_argument("--reuse-reference", action="store_true",
                   help="keep the reference's result from an earlier run in the same --workdir (same settings): it "
                        "runs no qlora-phi3 training code, so a change to ours does not change it")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)


def run_pipelines(script: str, args, model: Path, data: Path, settings: list[str]) -> dict | None:
    """Run ``script --worker reference`` then ``--worker ours``, each in a new interpreter with ``settings`` (the
    command-line flags both read); their result dicts with the 1-minute load average before and after each, or None
    (the failing worker's output printed) when one fails."""
    work = Path(args.workdir)
    results = {}
    for which in ("reference", "ours"):
        result = work / f"{which}.json"
        if which == "reference" and args.reuse_reference and result.is_file():
            results[which] = json.loads(result.read_text())
            continue
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(script).resolve()), "--worker", which, "--model", str(model), "--data",
               str(data), "--result", str(result), "--workdir", str(work), *settings]
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
        if proc.returncode != 0 or not result.is_file():
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return None
        results[which] = json.loads(result.read_text()) | {"load_before": load, "load_after": os.getloadavg()[0]}
        result.write_text(json.dumps(results[which]))
    return results


def compare_summary(args, results: dict, versions: dict, **extra) -> dict:
    """The comparison's record: machine, versions, settings, both pipelines' results, their training memory over the
    loaded model and its ratio, the speed ratio; ``extra`` fields (e.g. the recipe's settings) after the settings."""
    ref, ours = results["reference"], results["ours"]
    over = {k: r["peak_gib"] - r["loaded_gib"] for k, r in results.items()}
    return {"hardware": cpu_facts(), "versions": versions, "settings": vars(args) | {"worker": None}, **extra,
            "reference_reused": bool(args.reuse_reference), "reference": ref, "ours": ours, "over_loaded_gib": over,
            "training_memory_ratio": round(over["ours"] / over["reference"], 3),
            "speed_ratio": round(ours["tokens_per_second"] / ref["tokens_per_second"], 2)}


def write_compare(name: str, summary: dict, table_lines: list[str]) -> None:
    """bench/results/cpu_{name}_compare.json (the summary) and .md (``table_lines``)."""
    out = REPO / "bench" / "results"
    (out / f"cpu_{name}_compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"cpu_{name}_compare.md").write_text("\n".join(table_lines) + "\n")


def cpu_facts() -> dict:
    """The CPU's name, cores, bf16 flags (native bf16 or emulated) and the load average now."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in info})
    return {"cpu": name or os.uname().machine, "cores": os.cpu_count(), "bf16_flags": flags or "none (bf16 emulated)",
            "load_average": os.getloadavg()}


def note_rss_at_meter_reset(on_reset=None) -> dict:
    """Ours: ``train()`` resets its meter right before the first step, so the RSS then is what is loaded (model,
    adapter, trainer). Returns the dict that gets it as ``"rss"``; ``on_reset()`` runs at the same moment."""
    import qlora_phi3.memory.meter as meter_mod

    loaded = {}
    reset = meter_mod.PeakMemory.reset

    def reset_and_note(self):
        loaded["rss"] = meter_mod._rss_bytes()
        if on_reset is not None:
            on_reset()
        reset(self)

    meter_mod.PeakMemory.reset = reset_and_note
    return loaded


def train_reference(trainer, on_start=None) -> dict:
    """The reference: ``trainer.train()`` under the same sampled-RSS meter as ours; the RSS before it (what is
    loaded), the peak and the seconds. ``on_start()`` runs right before the first step."""
    import time

    from qlora_phi3.memory.meter import PeakMemory, _rss_bytes

    loaded = _rss_bytes()
    meter = PeakMemory("cpu", cpu_measure="rss")
    meter.reset()
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = meter.read()
    meter.close()
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"loaded_gib": loaded / 2**30, "peak_gib": peak.peak_allocated_gib, "tokens": tokens,
            "train_seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
            "steps": trainer.state.global_step}
