"""The longest-context GPU check: a few real training steps of recipes/phi3_mini_128k_12gb.yaml on random
full-size Phi-3-mini-128k weights, measured beside the estimator's prediction.

    python bench/gpu_long_context.py                      # on a GPU: the recipe's own length (94,208 tokens), 3 steps
    python bench/gpu_long_context.py --seq 65536          # another length
    python bench/gpu_long_context.py --dry-run            # on a CPU: a tiny model, 256 tokens, tiles of 64 (seconds)

Steps: build the Phi-3-mini-128k architecture (hidden 3072, 32 layers, MLP 8192, vocab 32064, 131,072 positions)
with random bf16 weights directly on the device (no fp32 copy: ~7.6 GB, not ~15), save it as safetensors with
the embedded tokenizer (its ids lie inside the vocabulary), write long generated conversations, then run
``qlora_phi3.run.train.train`` on the recipe (4-bit base, LoRA r=16, offloaded checkpointing, tiling,
chunked loss, flash-attn, packing) with only the model, data, steps and output overridden: the path users run.
The row (measured allocated / reserved / device-used GiB from run.json, the estimate, tokens/s) is appended
to ``--out`` as soon as it is measured. ``run_long_context_check`` is what bench/gpu_profile.py calls.
Budget on one H100/H200: ~2 min to build, save and load, ~20-40 s per step at 94k tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["main", "run_long_context_check"]

RECIPE = REPO / "recipes" / "phi3_mini_128k_12gb.yaml"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=704)


def _build(out_dir: Path, device: str, dry_run: bool) -> Path:
    """Random-weight Phi-3-mini-128k (or the tiny dry-run shape) built in bf16 on ``device`` and saved."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from qlora_phi3.memory.estimate import KNOWN_SHAPES
    from qlora_phi3.model.tiny import TINY_MODEL_DIR

    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir  # built by an earlier run
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sizes = {**KNOWN_SHAPES["microsoft/Phi-3-mini-128k-instruct"], "original_max_position_embeddings": 131072}
    if dry_run:
        sizes = {**sizes, **TINY}
    config = Phi3Config(**sizes, tie_word_embeddings=False, sliding_window=None, pad_token_id=eos, bos_token_id=1,
                        eos_token_id=eos)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: an fp32 build of Phi-3-mini needs ~15 GB
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    tmp.rename(out_dir)
    return out_dir


def run_long_context_check(work_dir: Path, results_md: Path, *, dry_run: bool = False, seq: int | None = None,
                           steps: int = 3) -> dict:
    """Train ``steps`` steps of the 128k recipe at ``seq`` tokens (default: the recipe's) on random weights;
    append the measured-vs-estimated row to ``results_md`` and return it."""
    import torch

    from bench.long_context import build_long_chats
    from qlora_phi3.config import load_recipe
    from qlora_phi3.memory.estimate import estimate
    from qlora_phi3.model.load import read_model_config
    from qlora_phi3.run.train import train

    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --dry-run to check the script on a CPU")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    recipe_seq = load_recipe(RECIPE).data.max_seq_len
    seq = seq or (256 if dry_run else recipe_seq)
    model_dir = _build(work_dir / ("tiny-128k" if dry_run else "phi3-mini-128k-random"), device, dry_run)
    data = build_long_chats(work_dir / f"long-{seq}.jsonl", seq + 512)
    overrides = [f"model.name_or_path={model_dir}", f"data.path={data}", "data.eval_split=null",
                 "data.eval_fraction=0.05", "data.max_eval_samples=1", f"data.max_seq_len={seq}",
                 f"train.max_steps={steps}", "train.grad_accum=1", "train.eval_steps=0", "train.save_steps=0",
                 "train.logging_steps=1", f"train.output_dir={work_dir / f'run-{seq}'}", f"train.device={device}"]
    if dry_run:  # no flash-attn and no offload target on a CPU; tiles smaller than the short row
        overrides += ["model.attn_implementation=sdpa", "train.tile_tokens=64"]
    recipe = load_recipe(RECIPE, overrides)
    t0 = time.perf_counter()
    run = train(recipe, force=True).run
    est = estimate(recipe, read_model_config(recipe.model), device, run["attn_implementation"])
    peak = run["peak_memory"]
    row = {"seq": seq, "tile_tokens": recipe.train.tile_tokens, "steps": run["steps"],
           "attn_implementation": run["attn_implementation"], "device": run["device"],
           "peak_allocated_gib": round(peak["peak_allocated_gib"], 3),
           "peak_reserved_gib": round(peak["peak_reserved_gib"], 3),
           "driver_used_gib": None if peak.get("driver_used_gib") is None else round(peak["driver_used_gib"], 3),
           "estimated_reserved_gib": round(est.reserved_gib, 3), "estimated_total_gib": round(est.total_gib, 3),
           "tokens_per_second": run["tokens_per_second"], "seconds": round(time.perf_counter() - t0, 1)}
    _append(results_md, row, dry_run)
    return row


def _append(path: Path, row: dict, dry_run: bool) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", encoding="utf-8") as f:
        if new:
            f.write("\n## Longest context: recipes/phi3_mini_128k_12gb.yaml, random full-size weights"
                    + (" (DRY RUN: tiny model on a CPU)" if dry_run else "") + "\n\n"
                    "| seq | tile | steps | attention | allocated GiB | reserved GiB | device used GiB | "
                    "estimated reserved GiB | estimated total GiB | error (reserved) | tokens/s |\n"
                    "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
        err = 100 * (row["estimated_reserved_gib"] - row["peak_reserved_gib"]) / row["peak_reserved_gib"]
        used = "-" if row["driver_used_gib"] is None else f"{row['driver_used_gib']:.2f}"
        f.write(f"| {row['seq']} | {row['tile_tokens']} | {row['steps']} | {row['attn_implementation']} | "
                f"{row['peak_allocated_gib']:.2f} | {row['peak_reserved_gib']:.2f} | {used} | "
                f"{row['estimated_reserved_gib']:.2f} | {row['estimated_total_gib']:.2f} | {err:+.1f}% | "
                f"{row['tokens_per_second'] or 0:,.0f} |\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (checks the script)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlora-gpu-long-context"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_long_context.md")
    args = parser.parse_args(argv)
    row = run_long_context_check(args.work, args.out, dry_run=args.dry_run, seq=args.seq, steps=args.steps)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
