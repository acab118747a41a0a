"""Where the wall time of a short ``qlora-phi3 train`` goes: setup, optimizer steps, evaluations, sample answers.

    python bench/train_share.py --write            # 20 steps of the default recipe, projected to its 300
    python bench/train_share.py --steps 300        # the default run itself (~75 s on 2 idle cores)

The run is ``qlora_phi3.run.train.train`` in this process, as ``qlora-phi3 train`` runs it (recipes/tiny_cpu.yaml,
the README's first run), for ``--steps`` steps with an evaluation every half of them, and the Trainer's
``evaluate`` timed (the step-0 evaluation, the in-loop ones, and the final one ``finish`` takes); the sample
answers' seconds come from run.json (``sample_seconds``, answered inside the in-loop evaluations' callbacks).
From the seconds per step and per evaluation it projects the recipe's own run (its max_steps, an evaluation
every eval_steps, the final one repeating the last), so a loaded machine can answer in a few minutes what share
of the default run is evaluation and sample answers.
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


def costs(result: dict, steps: int) -> dict:
    """Seconds of setup, one optimizer step, one in-loop evaluation (loss only), its sample answers, the final one."""
    run, evals = result["run"], result["evals"]
    samples = run.get("sample_seconds") or 0.0
    in_loop = evals[:-1]
    in_loop_s = sum(s for _, s in in_loop)
    final = evals[-1][1]
    return {"setup": result["wall_seconds"] - run["train_seconds"] - final,
            "step": (run["train_seconds"] - in_loop_s) / steps,
            "eval": (in_loop_s - samples) / len(in_loop), "samples": samples / len(in_loop), "final": final}


def projected(c: dict, max_steps: int, eval_steps: int) -> list[tuple[str, float]]:
    """The run of ``max_steps`` with an evaluation at step 0 and every ``eval_steps``, from per-part costs."""
    n_evals = 1 + max_steps // eval_steps
    return [("setup (data, model load, LoRA) and saving", c["setup"]),
            (f"optimizer steps ({max_steps})", c["step"] * max_steps),
            (f"evaluations inside the loop ({n_evals}: step 0 and every {eval_steps}), loss only",
             c["eval"] * n_evals),
            (f"sample answers ({n_evals} rounds)", c["samples"] * n_evals),
            ("final evaluation" + (" (repeats the last one)" if max_steps % eval_steps == 0 else ""), c["final"])]


def _table(rows: list[tuple[str, float]]) -> list[str]:
    wall = sum(sec for _, sec in rows)
    return (["| part of the run | seconds | share of the wall time |", "|---|---:|---:|"]
            + [f"| {name} | {sec:.1f} | {sec / wall:.0%} |" for name, sec in rows] + [f"| **whole run** | {wall:.1f} | |"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps measured (an evaluation every half of them)")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
    args = ap.parse_args(argv)
    from qlora_phi3.config import load_recipe, resolve_recipe
    from qlora_phi3.machine import cpu_bf16
    from qlora_phi3.run.record import device_info, package_versions

    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        result = timed_run([f"train.max_steps={args.steps}", f"train.eval_steps={max(1, args.steps // 2)}"],
                           Path(tmp) / "run")
    load_after = "/".join(f"{x:.2f}" for x in os.getloadavg())
    run, c = result["run"], costs(result, args.steps)
    own = load_recipe(resolve_recipe("tiny_cpu")).train
    cpu, versions = device_info("cpu"), package_versions()
    command = "python bench/train_share.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}) on {cpu['name']}, {cpu['cores']} "
             f"cores, bf16 flags: {', '.join(cpu.get('bf16_flags') or []) or 'none'} (native bf16: {cpu_bf16()[0]}),"
             f" no GPU; compute dtype {run['compute_dtype']}, {(run.get('cpu_threads') or {}).get('threads')} "
             f"thread(s); load average 1/5/15 min {load_before} before, {load_after} after. Versions: "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".", "",
             f"Measured: `recipes/tiny_cpu.yaml` for {args.steps} steps, evaluations at steps "
             f"{[s for s, _ in result['evals']]} (the last is the final one); per step {c['step']:.2f} s, per "
             f"evaluation {c['eval']:.2f} s + {c['samples']:.2f} s of sample answers, final evaluation "
             f"{c['final']:.2f} s, setup and saving {c['setup']:.1f} s.", "",
             *_table(projected(c, args.steps, max(1, args.steps // 2))), "",
             f"Projected to the recipe's own run ({own.max_steps} steps, an evaluation every {own.eval_steps}) from "
             "those per-part seconds:", "", *_table(projected(c, own.max_steps, own.eval_steps))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.write_text("# Where a short run's wall time goes, CPU\n\n" + text)
        RESULTS.with_suffix(".json").write_text(json.dumps(
            {"command": command, "cpu": cpu, "versions": versions, "load": [load_before, load_after],
             "wall_seconds": result["wall_seconds"], "evals": result["evals"], "costs": c,
             "run": {k: run.get(k) for k in ("steps", "train_seconds", "sample_seconds", "eval_loss_start",
                                             "eval_loss_end", "tokens_per_second", "compute_dtype")}},
            indent=1) + "\n")
        print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
