"""What the CPU itself decides: bf16 versus fp32 with and without native bf16, and threads beside a busy process.

    python bench/cpu_machine.py --write        # ~6 minutes on 2 idle cores; writes bench/results/cpu_machine.md
    python bench/cpu_machine.py --steps 10     # a quick look

Each row is the default recipe (``recipes/tiny_cpu.yaml``, the README's "Try it" run) for ``--steps`` optimizer
steps without evaluation, checkpoints or sample answers, in its own process, side by side in one session:

* ``native``: this CPU as it is; compute dtype forced to bf16, then fp32.
* ``avx2 kernels``: the same CPU limited to AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``),
  which is what a CPU without AVX512-BF16 or AMX runs: bf16 matmuls are emulated there. A stand-in for an
  AVX2-only machine measured on this one; the rows say so. bf16, fp32, then auto (which must pick fp32 there:
  ``machine.cpu_bf16`` reads the oneDNN cap).
* ``threads``: alone with the thread count qlora-phi3 picks, then beside one busy process (``yes > /dev/null``)
  with the pick (which sees the busy core) and with torch's own default (every core).

The machine must be otherwise idle: the script checks how busy it is first and prints it beside the results.
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
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _machine() -> dict:
    sys.path.insert(0, str(REPO))
    from qlora_phi3.machine import busy_cores, cpu_bf16, usable_cores
    from qlora_phi3.run.record import device_info, package_versions

    native, why = cpu_bf16()
    return {"cpu": device_info("cpu"), "native_bf16": native, "why": why, "usable_cores": usable_cores(),
            "busy_cores_before": round(busy_cores(1.0), 2), "versions": package_versions()}


def run_one(steps: int, out: Path, overrides: list[str], env: dict) -> dict:
    args = [sys.executable, "-m", "qlora_phi3", "train", f"train.output_dir={out}", f"train.max_steps={steps}",
            "train.eval_steps=0", "train.save_steps=0", "train.sample_prompts=0", "train.logging_steps=5", *overrides]
    t = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{overrides} {env} failed:\n{res.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    return {"tokens_per_second": run["tokens_per_second"], "train_seconds": run["train_seconds"],
            "wall_seconds": round(wall, 1), "threads": (run.get("cpu_threads") or {}).get("threads"),
            "train_loss_end": run["train_loss_end"], "compute_dtype": run["compute_dtype"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--write", action="store_true", help="write bench/results/cpu_machine.{md,json}")
    args = ap.parse_args(argv)
    machine = _machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def row(name, overrides=(), env=None, busy=False):
            spin = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
            try:
                if spin:
                    time.sleep(1.0)  # let it take its core before our thread count is picked
                r = run_one(args.steps, Path(tmp) / f"r{len(rows)}", list(overrides), env or {})
            finally:
                if spin:
                    spin.kill()
                    spin.wait()
            rows.append({"name": name, **r})
            print(f"{name:<52} {r['compute_dtype']:<9} {r['tokens_per_second']:>8,.0f} tokens/s  "
                  f"{r['threads']} threads  loss {r['train_loss_end']:.4f}", flush=True)

        row("native: bf16", ["model.compute_dtype=bfloat16"])
        row("native: fp32", ["model.compute_dtype=float32"])
        row("avx2 kernels (no native bf16): bf16", ["model.compute_dtype=bfloat16"], AVX2_ONLY)
        row("avx2 kernels (no native bf16): fp32", ["model.compute_dtype=float32"], AVX2_ONLY)
        row("avx2 kernels (no native bf16): auto", [], AVX2_ONLY)  # what a user gets there: fp32, by the oneDNN cap
        row("threads: alone, qlora-phi3's pick")
        row("threads: beside `yes`, qlora-phi3's pick", busy=True)
        row("threads: beside `yes`, torch default (all cores)", env={"OMP_NUM_THREADS": str(os.cpu_count())},
            busy=True)
    by = {r["name"]: r["tokens_per_second"] for r in rows}
    ratios = {
        "native bf16 / fp32": by["native: bf16"] / by["native: fp32"],
        "avx2 bf16 / fp32": by["avx2 kernels (no native bf16): bf16"] / by["avx2 kernels (no native bf16): fp32"],
        "busy: pick / torch default": by["threads: beside `yes`, qlora-phi3's pick"]
        / by["threads: beside `yes`, torch default (all cores)"],
        "busy pick / alone": by["threads: beside `yes`, qlora-phi3's pick"] / by["threads: alone, qlora-phi3's pick"],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        data = {"machine": machine, "steps": args.steps, "rows": rows, "ratios": ratios,
                "command": f"python bench/cpu_machine.py --write --steps {args.steps}"}
        (RESULTS / "cpu_machine.json").write_text(json.dumps(data, indent=2) + "\n")
        cpu = machine["cpu"]
        lines = [f"# CPU decisions measured side by side ({time.strftime('%Y-%m-%d')})", "",
                 f"`{data['command']}` on {cpu['name']} ({cpu['cores']} cores, bf16 flags: "
                 f"{', '.join(cpu.get('bf16_flags') or []) or 'none'}), no GPU; busy cores before the run: "
                 f"{machine['busy_cores_before']}. Versions: " + ", ".join(
                     f"{k} {v}" for k, v in machine["versions"].items() if v) + ".", "",
                 "The default recipe (tiny_cpu), " + f"{args.steps} optimizer steps, no eval/checkpoints/samples; "
                 "each row its own process. 'avx2 kernels' rows limit torch and oneDNN to AVX2 on this CPU "
                 "(ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): a stand-in for a CPU without native bf16, "
                 "not such a machine.", "",
                 "| run | compute dtype | tokens/s | threads | train s | final train loss |",
                 "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['name']} | {r['compute_dtype']} | {r['tokens_per_second']:,.0f} | {r['threads']} "
                         f"| {r['train_seconds']:.1f} | {r['train_loss_end']:.4f} |")
        lines += ["", *(f"- {k}: **{v:.2f}x**" for k, v in ratios.items()), ""]
        (RESULTS / "cpu_machine.md").write_text("\n".join(lines))
        print(f"wrote {RESULTS / 'cpu_machine.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
