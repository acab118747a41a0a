"""Where the wall time of a short ``qlora-phi3 train`` goes: setup, optimizer steps, evaluations, sample answers.

    python bench/train_share.py --write            # the default run (recipes/tiny_cpu.yaml), ~1-2 minutes idle
    python bench/train_share.py train.max_steps=100

The run is ``qlora_phi3.run.train.train`` in this process, as ``qlora-phi3 train`` runs it, with the Trainer's
``evaluate`` timed (the step-0 evaluation, each ``train.eval_steps`` one, and the final one ``finish`` takes);
the sample answers' seconds come from run.json (``sample_seconds``, answered inside the evaluations' callbacks,
so they are taken out of the evaluation time). A short run's fixed costs are what this shows: a share that is
large here is one a user pays on every quick experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "cpu_train_share.md"


def timed_run(overrides: list[str], out_dir: Path) -> dict:
    """The default recipe with ``overrides``, trained here; the seconds of each evaluation, and run.json."""
    import transformers

    from qlora_phi3.config import load_recipe, resolve_recipe
    from qlora_phi3.run.train import train
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    evals: list[tuple[int, float]] = []
    evaluate = transformers.Trainer.evaluate

    def timed(trainer, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return evaluate(trainer, *args, **kwargs)
        finally:
            evals.append((trainer.state.global_step, time.perf_counter() - t0))

    transformers.Trainer.evaluate = timed
    try:
        recipe = load_recipe(resolve_recipe("tiny_cpu"), [f"train.output_dir={out_dir}", *overrides])
        t0 = time.perf_counter()
        run = train(recipe, force=True).run
        wall = time.perf_counter() - t0
    finally:
        transformers.Trainer.evaluate = evaluate
    return {"wall_seconds": wall, "evals": evals, "run": run}


def shares(result: dict) -> list[tuple[str, float]]:
    run, evals = result["run"], result["evals"]
    samples = run.get("sample_seconds") or 0.0
    eval_s = sum(s for _, s in evals)
    final = evals[-1][1] if evals else 0.0
    in_loop = eval_s - final
    steps = run["train_seconds"] - in_loop  # the Trainer's loop minus the evaluations inside it
    return [("setup (data, model load, LoRA) and saving", result["wall_seconds"] - run["train_seconds"] - final),
            ("optimizer steps", steps),
            (f"evaluations inside the loop ({len(evals) - 1}: step 0 and every train.eval_steps), loss only",
             in_loop - samples),
            ("sample answers (at those evaluations)", samples),
            (f"final evaluation (step {evals[-1][0] if evals else '-'})", final)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="recipe overrides (key=value), as `qlora-phi3 train` takes them")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
    args = ap.parse_args(argv)
    from qlora_phi3.machine import cpu_bf16
    from qlora_phi3.run.record import device_info, package_versions

    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        result = timed_run(args.overrides, Path(tmp) / "run")
    load_after = "/".join(f"{x:.2f}" for x in os.getloadavg())
    rows = shares(result)
    wall = result["wall_seconds"]
    run = result["run"]
    cpu, versions = device_info("cpu"), package_versions()
    command = "python bench/train_share.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}) on {cpu['name']}, {cpu['cores']} "
             f"cores, bf16 flags: {', '.join(cpu.get('bf16_flags') or []) or 'none'} (native bf16: {cpu_bf16()[0]}),"
             f" no GPU; compute dtype {run['compute_dtype']}, {(run.get('cpu_threads') or {}).get('threads')} "
             f"thread(s); load average 1/5/15 min {load_before} before, {load_after} after. Versions: "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".", "",
             f"{run['steps']} steps; eval loss {run['eval_loss_start']:.4f} -> {run['eval_loss_end']:.4f}; "
             f"evaluations at steps {[s for s, _ in result['evals']]}.", "",
             "| part of the run | seconds | share of the wall time |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.1f} | {sec / wall:.0%} |" for name, sec in rows]
    lines.append(f"| **whole run** (train() in this process) | {wall:.1f} | 100% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.write_text("# Where a short run's wall time goes, CPU\n\n" + text)
        RESULTS.with_suffix(".json").write_text(json.dumps(
            {"command": command, "cpu": cpu, "versions": versions, "load": [load_before, load_after],
             "wall_seconds": wall, "evals": result["evals"], "rows": rows,
             "run": {k: run.get(k) for k in ("steps", "train_seconds", "sample_seconds", "eval_loss_start",
                                             "eval_loss_end", "tokens_per_second", "compute_dtype")}},
            indent=1) + "\n")
        print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
