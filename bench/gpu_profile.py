"""Profile full-size Phi-3-mini (random weights, no download) on one GPU and write bench/results/<gpu>.md.

Run by bench/gpu_profile.sh. Steps: build the Phi-3-mini-4k architecture from a Phi3Config with random
bf16 weights on the GPU, save it as safetensors (local disk, ~7.6 GB), then profile it through the real
code path (``model.load_model`` quantizes it to NF4, ``lora.attach_lora``, the recipe's optimizer) over
a grid that includes seq 512/2048 x rank 8/16/64, and write measured beside estimated figures.
Budget: about 1-2 min to build/save/load, ~10 s per configuration; at most 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GRID = ["lora.r=8,16,64", "data.max_seq_len=512,2048", "train.gradient_checkpointing=true,false"]


def phi3_mini_config():
    """Phi3Config with microsoft/Phi-3-mini-4k-instruct's shapes (hidden 3072, 32 layers, 32 heads, MLP 8192,
    vocab 32064, 4096 positions)."""
    from transformers import Phi3Config

    from qlora_phi3.memory.estimate import PHI3_MINI_4K_SIZES

    return Phi3Config(**PHI3_MINI_4K_SIZES, tie_word_embeddings=False, sliding_window=None, pad_token_id=32000,
                      bos_token_id=1, eos_token_id=32000)


def build_random_phi3_mini(out_dir: Path, device: str) -> Path:
    """Random-weight Phi-3-mini saved like a Hub model; initialised on ``device`` (fast on a GPU)."""
    import torch
    from transformers import Phi3ForCausalLM

    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir  # built by an earlier run
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(phi3_mini_config()).to(torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    tmp.rename(out_dir)
    return out_dir


def results_markdown(rows, meta: dict, command: str, seconds: float) -> str:
    """The results page: hardware and versions, then measured beside estimated for every configuration."""
    dev = meta["device"]
    v = meta["versions"]
    lines = [f"# Phi-3-mini (random weights) QLoRA profile on {dev.get('name')}", "",
             f"- hardware: {dev.get('name')}, {dev.get('vram_gib', '?')} GiB, compute capability "
             f"{dev.get('capability', '?')}, CUDA {dev.get('cuda', '?')}",
             f"- versions: torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}, "
             f"bitsandbytes {v.get('bitsandbytes')}, flash-attn {v.get('flash-attn')}",
             f"- compute dtype {meta['compute_dtype']}, attention {meta['attn_implementation']}, "
             f"{meta['warmup_steps']} warm-up + {meta['steps']} measured steps per configuration",
             f"- command: `{command}` ({seconds:.0f} s in all)",
             "- measured: `torch.cuda.max_memory_allocated` / `max_memory_reserved` reset after warm-up; driver: "
             "`mem_get_info` used memory after the steps (includes the CUDA context).",
             "- estimated: `qlora-phi3 estimate` for the same settings, allocator overhead included, context excluded "
             "(compare with reserved); error = (estimated - reserved) / reserved.",
             "- leaks between configurations: " + ("; ".join(meta["leaks"]) if meta["leaks"] else "none detected"),
             "",
             "| r | seq | batch | ckpt | status | allocated GiB | reserved GiB | driver GiB | estimated GiB | error | "
             "tokens/s | step s |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for r in rows:
        lines.append(f"| {r.lora_r} | {r.max_seq_len} | {r.micro_batch_size} | {r.gradient_checkpointing} | "
                     f"{r.status} | {f(r.peak_allocated_gib)} | {f(r.peak_reserved_gib)} | {f(r.driver_used_gib)} | "
                     f"{f(r.estimated_gib)} | {f(r.estimate_error_pct, '{:+.1f}%')} | "
                     f"{f(r.tokens_per_second, '{:,.0f}')} | {f(r.step_seconds)} |")
    ok = [abs(r.estimate_error_pct) for r in rows if r.estimate_error_pct is not None]
    if ok:
        lines += ["", f"Largest estimate error: {max(ok):.1f}% (target: within 10% of reserved on every row)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/phi3-mini-random", help="where the random model is saved")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for <gpu>.md and profile files")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--grid", nargs="+", default=GRID)
    p.add_argument("--device", default="cuda", help="cuda (the point of this script); cpu only for a smoke test")
    p.add_argument("--sizes", default="", help="override shapes for a smoke test, e.g. num_hidden_layers=2")
    args = p.parse_args(argv)

    import torch

    from qlora_phi3.cli import _quiet_libraries
    from qlora_phi3.run.profile import grid_recipes, profile, render_table, write_results
    from qlora_phi3.ui import console, info

    _quiet_libraries()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: this benchmark needs one (see bench/gpu_profile.sh).", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model_dir = Path(args.model_dir)
    if args.sizes:  # smoke test on a smaller model with the same code path
        from qlora_phi3.run.profile import write_random_phi3

        from qlora_phi3.memory.estimate import PHI3_MINI_4K_SIZES

        sizes = {**PHI3_MINI_4K_SIZES, **{k: int(v) for k, v in (kv.split("=") for kv in args.sizes.split(","))}}
        if not (model_dir / "config.json").is_file():
            write_random_phi3(model_dir, **sizes)
    else:
        build_random_phi3_mini(model_dir, args.device)
    info(f"model ready in {time.perf_counter() - t0:.0f} s: {model_dir}")
    recipe = str(REPO / "recipes" / "phi3_mini_4k_12gb.yaml")
    overrides = [f"model.name_or_path={model_dir}", "model.revision=null", "train.micro_batch_size=1",
                 f"train.device={args.device}"]
    configs = grid_recipes(recipe, overrides, args.grid)
    rows, meta = profile(configs, steps=args.steps, warmup=1, budget_gib=12.0)
    console().print(render_table(rows, meta))
    name = meta["device"].get("name", args.device).replace(" ", "_").replace("/", "_")
    out = Path(args.out)
    paths = write_results(rows, meta, out / f"{name}_profile")
    command = "bash bench/gpu_profile.sh" + (f" (python bench/gpu_profile.py {' '.join(argv or sys.argv[1:])})"
                                              if (argv or sys.argv[1:]) else "")
    md = out / f"{name}.md"
    md.write_text(results_markdown(rows, meta, command, time.perf_counter() - t0), encoding="utf-8")
    info(f"wrote {md} and {paths['csv'].parent}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
