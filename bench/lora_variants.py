"""What each LoRA variant costs on the tiny model: the same run, side by side.

    nice -n 10 python bench/lora_variants.py --write       # writes bench/results/cpu_lora_variants.md
    python bench/lora_variants.py --steps 20               # a quick look

Each variant runs the default recipe (``recipes/tiny_cpu.yaml``: embedded tiny Phi-3, r=16 on the four fused
targets, micro-batch 16, paged 8-bit AdamW, checkpointing) for ``--steps`` optimizer steps in its own process,
through ``qlora_phi3.run.train.train(recipe, cpu_memory="tensors")``, with sample answers off so that only the
variant differs. Memory is the live-tensor peak from run.json (what the estimator predicts, beside it); time is
the run's train seconds (the live-tensor meter slows every run alike) and its step-0 and final eval losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VARIANTS = {
    "LoRA (default)": [],
    "rsLoRA": ["lora.use_rslora=true"],
    "DoRA": ["lora.use_dora=true"],
    "OLoRA init": ["lora.init=olora"],
    "LoftQ init": ["lora.init=loftq"],
    "PEFT default init": ["lora.init=default"],
    "NEFTune (alpha 5)": ["train.neftune_noise_alpha=5"],
}


def _cpu_name() -> str:
    sys.path.insert(0, str(REPO))
    from qlora_phi3.run.record import device_info

    return device_info("cpu")["name"]


def run_one(overrides: list[str], out: Path) -> dict:
    """One variant in a fresh process; its run.json, and the estimator's peak for its recipe."""
    code = ("import sys, json; from qlora_phi3.config import load_recipe; from qlora_phi3.run.train import train; "
            "from qlora_phi3.memory.estimate import estimate, config_for_estimate; "
            "r = load_recipe('tiny_cpu', sys.argv[1:]); res = train(r, cpu_memory='tensors'); "
            "print('ESTIMATE', estimate(r, config_for_estimate(r.model), 'cpu').tensor_gib)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code, *overrides, f"train.output_dir={out}"], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{overrides} failed:\n{res.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    run["estimated_gib"] = float(res.stdout.rsplit("ESTIMATE", 1)[1].split()[0])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--write", action="store_true", help="save bench/results/cpu_lora_variants.md")
    args = parser.parse_args()
    common = [f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}", "train.save_steps=0",
              "train.sample_prompts=0"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            run = run_one(common + overrides, Path(tmp) / str(i))
            rows.append((name, overrides, run))
            print(f"{name}: {run['peak_memory']['peak_allocated_gib'] * 1024:.1f} MiB, {run['train_seconds']:.1f} s",
                  flush=True)
    base = rows[0][2]
    lines = [
        "# LoRA variants on the tiny model, side by side",
        "",
        f"Hardware: {_cpu_name()}, {os.cpu_count()} CPU cores, no GPU; load average "
        f"at the end {os.getloadavg()[0]:.1f} (shared machine: seconds vary from run to run). "
        f"Date: {time.strftime('%Y-%m-%d')}.",
        f"Command: `OMP_NUM_THREADS=1 nice -n 10 python bench/lora_variants.py --steps {args.steps} --write`",
        "",
        f"Each row: `recipes/tiny_cpu.yaml` + the variant, {args.steps} optimizer steps (the recipe's micro-batch), its own "
        "process, sample answers off, live-tensor memory meter.",
        "",
        "| variant | overrides | peak MiB (measured) | estimated MiB | train s | x default | eval loss step 0 -> end |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, overrides, run in rows:
        peak = run["peak_memory"]["peak_allocated_gib"] * 1024
        lines.append(f"| {name} | {' '.join(overrides) or '-'} | {peak:.1f} | {run['estimated_gib'] * 1024:.1f} | "
                     f"{run['train_seconds']:.1f} | {run['train_seconds'] / base['train_seconds']:.2f}x | "
                     f"{run['eval_loss_start']:.3f} -> {run['eval_loss_end']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cpu_lora_variants.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
