"""Every check that only a GPU can make, in one prepared script: full-size Phi-3-mini with random weights
(no download), through the same code paths users run. Each result is appended to
``bench/results/<gpu>.md`` the moment it is measured, so a run cut short keeps what it got.

    python bench/gpu_check.py                 # on one CUDA GPU, about 8 minutes; no network needed
    python bench/gpu_check.py --dry-run       # every step on the CPU with the tiny model (tests/project/test_gpu_check.py)

Steps, most important first (each records its error and the script goes on; steps that would not end
before ``--budget-s`` are recorded as skipped):

1. build   random Phi-3-mini-4k in bf16, built on the GPU (a fp32 build would need 15 GB first), saved locally
2. train   a few real ``qlora-phi3 train`` steps of recipes/phi3_mini_4k_12gb.yaml on it (run.json: peak, tok/s)
2b. dpo    two DPO steps of recipes/phi3_mini_4k_12gb_dpo.yaml on pairs whose chosen and rejected rows each fill
           2,048 tokens (reference forward with the adapter off), peak beside the estimate
3. packing packed rows vs each sample alone: logits must agree, on sdpa and (if installed) flash_attention_2,
           with micro-batches of 1 and 2 rows (flash-attn only isolates samples when told their boundaries)
4. fp16    a forced fp16 run (the pre-Ampere path: loss scaling, fp32 adapter weights)
5. grid    ``qlora-phi3 profile``: seq 512/2048/8192 x r 8/16/64, reserved / allocated / device used vs estimate
6. long    random Phi-3-mini-128k; a few steps of recipes/phi3_mini_128k_12gb.yaml at its length, beside the estimate
7. merge   ``qlora-phi3 merge`` of the step-2 run into fp16, with a one-sample report
8. eval    ``qlora-phi3 eval`` of the step-2 run (4-bit as trained, adapter off then on): the shipped task, then a local
           task (--include-path) whose requests fill the model's context, with the batch the estimate picks for the
           card; measured peak beside the estimate
9. phi4    random Phi-4-mini-instruct at full size (grouped KV 24/8, partial rotary 0.75, tied embeddings, 200,064
           vocabulary, its o200k tokenizer), a few steps of recipes/phi4_mini_12gb.yaml at 2,048 tokens beside the
           estimate for the same settings
9b. phi4_14b random Phi-4 (14B) at full size (built in bf16 on the GPU: ~29 GB of GPU memory and disk), a few steps
           of recipes/phi4_12gb.yaml at its own length (6,144 tokens, offloaded checkpoints, tiling) beside the estimate
9c. grpo   on that random Phi-4-mini, two GRPO steps of recipes/phi4_mini_12gb_grpo.yaml (generation with the adapter
           active: a random model writes to train.max_completion_len, generation's worst case), peak beside the
           estimate
9d. grpo_vllm the same with train.generator=vllm (a colocated vLLM fed the adapter as a LoRA), where vLLM is
           installed; said not run otherwise
10. speed  bench/compare.py at the real shape: one pass over the mixed-length chat set, ours against the cookbook
           pipeline in the GPU's dtype (the ratio a CPU can only derive), and ours with flash-attn's varlen path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable from a checkout without an install
    sys.path.insert(0, str(REPO))

PHI3_MINI_SIZES = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                       original_max_position_embeddings=4096)
DRY_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096,
                 original_max_position_embeddings=4096)


class Report:
    """bench/results/<gpu>.md, appended to and flushed after every step."""

    def __init__(self, path: Path, header: str):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "\n", encoding="utf-8")

    def add(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text.rstrip() + "\n\n")
            f.flush()
            os.fsync(f.fileno())
        print(text, flush=True)


# --dry-run runs each command in this process: the dry run checks the script's steps and the commands' arguments,
# and a new interpreter per command (~7 s of torch and transformers imports on a 2-core Xeon with avx512_bf16) only made it slower. On a GPU
# each command gets its own process, so that no step's memory figures include an earlier step's leftovers.
IN_PROCESS = False


def _qlora(*args: str, timeout: float) -> subprocess.CompletedProcess:
    if IN_PROCESS:
        import contextlib
        import io

        from qlora_phi3.cli import main as cli_main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(list(args))
        return subprocess.CompletedProcess(["qlora-phi3", *args], code, out.getvalue(), err.getvalue())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "qlora_phi3", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _checked(res: subprocess.CompletedProcess) -> None:
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {(res.stderr or res.stdout).strip()[-800:]}")


def _run_summary(run_dir: Path) -> str:
    run = json.loads((run_dir / "run.json").read_text())
    mem = run.get("peak_memory") or {}
    return (f"status {run['status']}, {run.get('steps')} steps, {run.get('tokens_per_second')} tokens/s, peak "
            f"allocated {mem.get('peak_allocated_gib', 0):.2f} GiB / reserved {mem.get('peak_reserved_gib', 0):.2f} GiB"
            f" / device used {mem.get('driver_used_gib') or 0:.2f} GiB, compute {run.get('compute_dtype')}, "
            f"attention {run.get('attn_implementation')}")


def step_build(ctx) -> str:
    from qlora_phi3.model.tiny import write_random_phi3

    if not (ctx.model_dir / "config.json").is_file():
        write_random_phi3(ctx.model_dir, device=ctx.device, **ctx.sizes)
    size_gb = sum(p.stat().st_size for p in ctx.model_dir.glob("*.safetensors")) / 1e9
    return f"random Phi-3 ({ctx.sizes['num_hidden_layers']} layers, hidden {ctx.sizes['hidden_size']}) at " \
           f"{ctx.model_dir}: {size_gb:.2f} GB of bf16 safetensors"


def _train_args(ctx, name: str, *extra: str) -> list[str]:
    return ["train", "phi3_mini_4k_12gb", f"model.name_or_path={ctx.model_dir}", "model.revision=null",
            f"data.path={ctx.data_path}", "data.eval_split=null", "data.max_eval_samples=2", "train.eval_steps=0",
            "train.save_steps=0", "train.logging_steps=1", f"train.output_dir={ctx.work / name}", "--force",
            *ctx.train_overrides, *extra]


def step_train(ctx) -> str:
    steps = 1 if ctx.dry else 3
    _checked(_qlora(*_train_args(ctx, "train", f"train.max_steps={steps}"), timeout=ctx.remaining()))
    return f"`qlora-phi3 train phi3_mini_4k_12gb` ({steps} steps): " + _run_summary(ctx.work / "train")


def step_dpo(ctx) -> str:
    """DPO on the full-size model at 2,048 tokens per row (a pair is two rows), beside the estimator's prediction."""
    from qlora_phi3.config import load_recipe
    from qlora_phi3.memory.estimate import estimate
    from qlora_phi3.model.load import read_model_config

    seq = 128 if ctx.dry else 2048
    run_dir = ctx.work / "dpo"
    _checked(_qlora("train", "phi3_mini_4k_12gb_dpo", f"model.name_or_path={ctx.model_dir}", "model.revision=null",
                    f"data.path={ctx.pairs_path(seq)}", "data.eval_split=null", "data.max_eval_samples=2",
                    "data.max_prompt_len=null", f"data.max_seq_len={seq}", "train.eval_steps=0", "train.save_steps=0",
                    "train.logging_steps=1", "train.max_steps=2", "train.grad_accum=1", f"train.output_dir={run_dir}",
                    "--force", *(o for o in ctx.train_overrides if not o.startswith("data.max_seq_len=")),
                    timeout=ctx.remaining()))
    run = json.loads((run_dir / "run.json").read_text())
    ran = load_recipe(run_dir / "recipe.yaml")
    est = estimate(ran, read_model_config(ran.model), ctx.device, run.get("attn_implementation"))
    return (f"phi3_mini_4k_12gb_dpo at {seq:,} tokens per row, {ran.train.micro_batch_size} pair(s) = "
            f"{2 * ran.train.micro_batch_size} rows per forward (2 steps): {_run_summary(run_dir)}; reference "
            f"{run.get('reference')}; estimated reserved {est.reserved_gib:.2f} GiB, total {est.total_gib:.2f} GiB")


def step_fp16(ctx) -> str:
    steps = 1 if ctx.dry else 2  # fp16 matmuls are emulated on a CPU: slow even at the dry run's sizes
    _checked(_qlora(*_train_args(ctx, "fp16", f"train.max_steps={steps}", "model.compute_dtype=float16"),
                    timeout=ctx.remaining()))
    run = json.loads((ctx.work / "fp16" / "run.json").read_text())
    losses = [h["loss"] for h in run["history"] if "loss" in h]
    return f"forced fp16 ({steps} steps): {_run_summary(ctx.work / 'fp16')}; losses {losses}"


def step_speed(ctx) -> str:
    """bench/compare.py's question at the real shape, where no CPU can answer it: one pass over the mixed-length chat
    set on full-size Phi-3-mini, ours (``phi3_mini_4k_12gb`` as shipped: packed rows, chunked loss) against the
    cookbook pipeline (micro-batches of 8 padded to their longest, TRL's fused head), both in the GPU's compute
    dtype; then ours on flash-attn's varlen path if it is installed. Tokens/s: real tokens over the steps' time."""
    from bench.compare import build_chat_set, run_worker
    from qlora_phi3.model.load import pick_compute_dtype

    n, scale = (9, 8) if ctx.dry else (106, 1)
    data = build_chat_set(ctx.work / f"speed-chats-{n}.jsonl", n, pair_scale=scale)
    base = {"model_dir": str(ctx.model_dir), "data_path": str(data), "micro_batch_ref": 8, "device": ctx.device,
            "reference_dtype": pick_compute_dtype("auto", ctx.device).value,
            "ours_overrides": [o for o in ctx.train_overrides if not o.startswith("data.max_seq_len=")]}
    runs = [("reference", "reference", []), ("ours", "ours", [])]
    try:
        import flash_attn  # noqa: F401

        runs.append(("ours, flash_attention_2 (varlen)", "ours", ["model.attn_implementation=flash_attention_2"]))
    except ImportError:
        pass
    lines, tps = [], {}
    for label, which, extra in runs:
        work = ctx.work / f"speed-{len(tps)}"
        work.mkdir(parents=True, exist_ok=True)
        spec = dict(base, workdir=str(work), ours_overrides=base["ours_overrides"] + extra)
        (work / "spec.json").write_text(json.dumps(spec))
        r = run_worker(which, work / "spec.json", in_process=ctx.dry)
        tps[label] = r["tokens_per_second"]
        lines.append(f"{label}: {r['tokens_per_second']:,.0f} tokens/s, {r['tokens']:,} real + {r['padded_tokens']:,}"
                     f" padding tokens, {r['steps']} steps, {r['compute_dtype']}")
    ratios = "; ".join(f"{k} / reference {v / tps['reference']:.2f}x" for k, v in tps.items() if k != "reference")
    return (f"one pass over {n} conversations (pairs / {scale}): " + "; ".join(lines) + f". Ratios: {ratios}")


def step_packing(ctx) -> str:
    """Each packed sample's logits against its logits alone, per attention implementation and batch rows."""
    import torch

    from qlora_phi3.config import ModelConfig
    from qlora_phi3.data.packing import PackingCollator, pack_columns, to_model_inputs
    from qlora_phi3.model.load import load_model, pick_compute_dtype

    impls = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        impls.append("flash_attention_2")
    except ImportError:
        pass
    # fp32 in the dry run: bf16's rounding (0.125 at the tiny model's |logits| of 16-32) would hide a small leak
    dtype = "float32" if ctx.dry else pick_compute_dtype("auto", ctx.device).value
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (37, 120, 64, 200, 90, 11)]
    cols = pack_columns(samples, samples, 256)
    lines = []
    for impl in impls:
        model = load_model(ModelConfig(name_or_path=str(ctx.model_dir)), ctx.device, dtype, impl).eval()
        for rows_per_batch in (1, 2):
            feats = [{"input_ids": i, "labels": lab, "seq_lens": s}
                     for i, lab, s in zip(cols["input_ids"], cols["labels"], cols["seq_lens"])][:rows_per_batch]
            batch = PackingCollator(0)(feats)
            width = batch["input_ids"].shape[1]  # each row padded to the longest; flash flattens rows in order
            inputs = {k: v.to(ctx.device) if torch.is_tensor(v) else v
                      for k, v in to_model_inputs(batch, impl, None).items() if k != "labels"}
            worst = 0.0
            with torch.no_grad():
                packed = model(**inputs).logits.float().reshape(-1, model.config.vocab_size)
                for b, f in enumerate(feats):
                    start = 0
                    for n in f["seq_lens"]:
                        ids = batch["input_ids"][b, start:start + n][None].to(ctx.device)
                        alone = model(input_ids=ids).logits.float()[0]
                        got = packed[b * width + start:b * width + start + n]
                        worst = max(worst, (got - alone).abs().max().item())
                        start += n
            lines.append(f"{impl}, {rows_per_batch} row(s) per micro-batch: max |logit diff| {worst:.4f}")
        del model
    return "packed vs alone (" + dtype + "): " + "; ".join(lines)


def step_grid(ctx) -> str:
    from qlora_phi3.config import resolve_recipe
    from qlora_phi3.run.profile import grid_recipes, profile

    configs = grid_recipes(resolve_recipe("phi3_mini_4k_12gb"),
                           [f"model.name_or_path={ctx.model_dir}", "model.revision=null", "train.micro_batch_size=1",
                            "train.grad_accum=1", *ctx.train_overrides], ctx.grid)
    rows, meta = profile(configs, steps=2, warmup=1, budget_gib=12.0, recipe_name="phi3_mini_4k_12gb")
    lines = ["| r | seq | status | allocated GiB | reserved GiB | device used GiB | estimated GiB | error | tokens/s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for r in rows:
        lines.append(f"| {r.lora_r} | {r.max_seq_len} | {r.status} | {f(r.peak_allocated_gib)} | "
                     f"{f(r.peak_reserved_gib)} | {f(r.driver_used_gib)} | {f(r.estimated_gib)} | "
                     f"{f(r.estimate_error_pct, '{:+.1f}%')} | {f(r.tokens_per_second, '{:,.0f}')} |")
    return ("`qlora-phi3 profile` (each configuration in a fresh process; 1 warm-up + 2 measured steps; estimate = "
            "reserved incl. allocator overhead, error against reserved):\n\n" + "\n".join(lines))


def step_long(ctx) -> str:
    """The 128k recipe at its own length on Phi-3-mini-128k's architecture (longrope factors, 131,072 positions),
    measured beside the estimator's prediction for the same settings."""
    from qlora_phi3.config import load_recipe, resolve_recipe
    from qlora_phi3.memory.estimate import estimate
    from qlora_phi3.model.load import read_model_config
    from qlora_phi3.model.tiny import write_random_phi3

    if not (ctx.long_model_dir / "config.json").is_file():
        # the 128k config's own context (131,072 positions over 4,096 original: the longrope factors apply)
        sizes = {k: v for k, v in ctx.sizes.items() if not k.endswith("max_position_embeddings")}
        write_random_phi3(ctx.long_model_dir, device=ctx.device, kind="128k", **sizes)
    recipe = load_recipe(resolve_recipe("phi3_mini_128k_12gb"), [])
    seq = ctx.long_seq or recipe.data.max_seq_len
    long_overrides = [o for o in ctx.train_overrides if not o.startswith("data.max_seq_len=")]
    if ctx.dry:  # tiles smaller than the dry run's 256-token rows, so the tiled layers run too
        long_overrides += ["train.tile_tokens=64"]
    try:
        import flash_attn  # noqa: F401  (the recipe asks for it; a GPU box without it still measures sdpa)
    except ImportError:
        long_overrides += ["model.attn_implementation=sdpa"]
    _checked(_qlora("train", "phi3_mini_128k_12gb", f"model.name_or_path={ctx.long_model_dir}", "model.revision=null",
                    f"data.path={ctx.long_data_path(seq)}", "data.eval_split=null", "data.max_eval_samples=1",
                    f"data.max_seq_len={seq}", "train.eval_steps=0", "train.save_steps=0", "train.logging_steps=1",
                    "train.max_steps=2", "train.grad_accum=1", f"train.output_dir={ctx.work / 'long'}", "--force",
                    *long_overrides, timeout=ctx.remaining()))
    run_dir = ctx.work / "long"
    run = json.loads((run_dir / "run.json").read_text())
    ran = load_recipe(run_dir / "recipe.yaml")
    est = estimate(ran, read_model_config(ran.model), ctx.device, run.get("attn_implementation"))
    return (f"phi3_mini_128k_12gb at {seq:,} tokens, tiles of {ran.train.tile_tokens or 'off'} (2 steps): "
            f"{_run_summary(run_dir)}; estimated reserved {est.reserved_gib:.2f} GiB, total {est.total_gib:.2f} GiB")


def step_merge(ctx) -> str:
    out = ctx.work / "merged"
    _checked(_qlora("merge", str(ctx.work / "train"), "--out", str(out), "--force", "--report-samples", "1",
                    timeout=ctx.remaining()))
    report = json.loads((out / "merge_report.json").read_text())
    models = report["models"]
    return (f"`qlora-phi3 merge` in {report['seconds']} s, peak RSS {report['peak_rss_gib']} GiB; eval loss (a) "
            f"{models['a']['eval_loss']:.4f} (b) {models['b']['eval_loss']:.4f} (c) {models['c']['eval_loss']:.4f}")


def _long_task(ctx, n_tokens: int, n_docs: int) -> Path:
    """A local lm-eval task (a folder for --include-path) of two-way choices after a context of ``n_tokens``: every
    request fills the rows the eval batch size was chosen for, the estimate's worst case."""
    from qlora_phi3.config import ModelConfig
    from qlora_phi3.data.synthetic import write_full_length_conversations
    from qlora_phi3.model.load import load_tokenizer

    folder = ctx.work / f"long_task_{n_tokens}"
    folder.mkdir(exist_ok=True)
    chats = folder / "chats.jsonl"
    write_full_length_conversations(chats, load_tokenizer(ModelConfig(name_or_path=str(ctx.model_dir))), n_docs,
                                    n_tokens)
    docs = [{"question": json.loads(line)["messages"][1]["content"], "choices": ["yes", "no"], "answer": 0}
            for line in chats.read_text().splitlines()]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "long_context_mc.yaml").write_text(
        "task: long_context_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: answer\n")
    return folder


def step_eval(ctx) -> str:
    """``qlora-phi3 eval`` on the full-size shape: base vs fine-tune on the step-2 run, the batch size chosen by the
    estimate for the card at the model's context, the peak measured beside it."""
    seq = 256 if ctx.dry else 4096
    out = ctx.work / "eval"
    device = ["--device", "cpu", "--batch-size", "2"] if ctx.dry else []
    _checked(_qlora("eval", str(ctx.work / "train"), "--tasks", "tiny_chat_facts,long_context_mc", "--include-path",
                    str(_long_task(ctx, seq - 8, 4 if ctx.dry else 48)), "--max-length", str(seq), "--limit",
                    "8" if ctx.dry else "48", "--out", str(out), *device, timeout=ctx.remaining()))
    summary = json.loads((out / "eval_summary.json").read_text())
    acc = {(r["task"], r["metric"]): r for r in summary["rows"]}[("tiny_chat_facts", "acc")]
    models = summary["models"]
    peaks = ", ".join(f"{label} {m['seconds']} s, peak reserved {m.get('peak_reserved_gib', '-')} GiB"
                      for label, m in models.items())
    return (f"`qlora-phi3 eval` at {seq:,} tokens per row, batch {summary['settings']['batch_size']} "
            f"({summary['batch_size_reason']}): {peaks}; tiny_chat_facts acc base {acc['base']:.3f} -> fine-tune "
            f"{acc['finetune']:.3f} (random weights: the numbers are not the point)")


def step_phi4(ctx) -> str:
    """Phi-4-mini's shape at full size: the estimate must hold for grouped KV, partial rotary, the tied 200,064-row
    matrix and its 6x wider logits, which no Phi-3 step exercises."""
    return _family_step(ctx, "phi4-mini", "phi4_mini_12gb", 2048)


def step_phi4_14b(ctx) -> str:
    """Phi-4 (14B) at full size at its recipe's length: the 4-bit 40-layer base, the untied 16-bit 100,352-row
    embedding and head, offloaded checkpoints and tiling, measured beside the estimate (the recipe's margin)."""
    return _family_step(ctx, "phi4", "phi4_12gb", None, dry_overrides=("train.tile_tokens=64",))


def _family_step(ctx, shape: str, recipe_name: str, seq: int | None, dry_overrides: tuple = ()) -> str:
    """A few steps of ``recipe_name`` on random weights of ``shape`` (model/tiny.py's TINY_SHAPES; at full size on a
    GPU, tiny in a dry run) at ``seq`` tokens (None: the recipe's own length), beside the estimate."""
    from qlora_phi3.config import ModelConfig, load_recipe, resolve_recipe
    from qlora_phi3.data.synthetic import write_full_length_conversations
    from qlora_phi3.family import family_for_config
    from qlora_phi3.memory.estimate import estimate
    from qlora_phi3.model.load import load_tokenizer, read_model_config
    from qlora_phi3.model.tiny import TINY_SHAPES, build_model_dir, mini_config

    hub_id, tiny_sizes = TINY_SHAPES[shape]
    model_dir = ctx.work / (f"tiny-{shape}" if ctx.dry else f"{shape}-random")
    if not (model_dir / "config.json").is_file():
        build_model_dir(model_dir, mini_config(hub_id, **(tiny_sizes if ctx.dry else {})), device=ctx.device)
    seq = 128 if ctx.dry else seq or load_recipe(resolve_recipe(recipe_name), []).data.max_seq_len
    data = ctx.work / f"{shape}-chats-{seq}.jsonl"
    if not data.is_file():
        write_full_length_conversations(data, load_tokenizer(ModelConfig(name_or_path=str(model_dir))), 48, seq)
    steps = 1 if ctx.dry else 3
    run_dir = ctx.work / shape
    overrides = [o for o in ctx.train_overrides if not o.startswith("data.max_seq_len=")]
    if ctx.dry:  # CPUs without native bf16 emulate it ~10x slower (docs/pitfalls.md); the dry run checks the path only
        overrides += ["model.compute_dtype=float32", *dry_overrides]
    _checked(_qlora("train", recipe_name, f"model.name_or_path={model_dir}", "model.revision=null",
                    f"data.path={data}", "data.eval_split=null", "data.max_eval_samples=2", f"data.max_seq_len={seq}",
                    "train.eval_steps=0", "train.save_steps=0", "train.logging_steps=1", f"train.max_steps={steps}",
                    f"train.output_dir={run_dir}", "--force", *overrides, timeout=ctx.remaining()))
    run = json.loads((run_dir / "run.json").read_text())
    ran = load_recipe(run_dir / "recipe.yaml")
    est = estimate(ran, read_model_config(ran.model), ctx.device, run.get("attn_implementation"))
    cfg = read_model_config(ran.model)
    return (f"{recipe_name} at {seq:,} tokens on random {family_for_config(cfg).title} (hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocabulary {cfg.vocab_size:,}, tied "
            f"{cfg.tie_word_embeddings}) ({steps} steps): {_run_summary(run_dir)}; estimated reserved "
            f"{est.reserved_gib:.2f} GiB, total {est.total_gib:.2f} GiB")


def step_grpo(ctx) -> str:
    """GRPO on step 8's random Phi-4-mini: generation's KV cache and the training step, beside the estimate."""
    return _grpo(ctx, "grpo")


def step_grpo_vllm(ctx) -> str:
    """The same two steps sampled by a colocated vLLM fed the adapter as a LoRA (train.generator=vllm), where vLLM
    is installed: the first run of that path on vLLM itself."""
    import importlib.util

    if ctx.dry or importlib.util.find_spec("vllm") is None:
        return "not run: " + ("a dry run has no CUDA" if ctx.dry else "vLLM is not installed on this machine")
    return _grpo(ctx, "grpo-vllm", "train.generator=vllm", "train.vllm_gib=6")


def _grpo(ctx, name: str, *extra: str) -> str:
    from qlora_phi3.config import load_recipe
    from qlora_phi3.data.synthetic import generate_prompts, write_jsonl
    from qlora_phi3.memory.estimate import estimate
    from qlora_phi3.model.load import read_model_config

    model_dir = ctx.work / ("tiny-phi4-mini" if ctx.dry else "phi4-mini-random")
    if not (model_dir / "config.json").is_file():
        raise RuntimeError("needs step phi4's random model (run --only phi4 grpo)")
    data = ctx.work / "grpo-prompts.jsonl"
    write_jsonl(data, [{"prompt": r["prompt"], "solution": r["answer"]} for r in generate_prompts()])
    seq, completion = (128, 16) if ctx.dry else (1536, 1024)
    run_dir = ctx.work / name
    overrides = [o for o in ctx.train_overrides if not o.startswith("data.max_seq_len=")] + list(extra)
    if ctx.dry:
        overrides += ["model.compute_dtype=float32", "train.num_generations=4", "train.micro_batch_size=4",
                      "train.grad_accum=1"]
    _checked(_qlora("train", "phi4_mini_12gb_grpo", f"model.name_or_path={model_dir}", "model.revision=null",
                    f"data.path={data}", "data.split=train", "data.max_eval_samples=1", f"data.max_seq_len={seq}",
                    f"train.max_completion_len={completion}", "train.eval_steps=0", "train.save_steps=0",
                    "train.logging_steps=1", "train.max_steps=2", "train.sample_prompts=0",
                    f"train.output_dir={run_dir}", "--force", *overrides, timeout=ctx.remaining()))
    run = json.loads((run_dir / "run.json").read_text())
    ran = load_recipe(run_dir / "recipe.yaml")
    est = estimate(ran, read_model_config(ran.model), ctx.device, run.get("attn_implementation"))
    t = ran.train
    return (f"phi4_mini_12gb_grpo at {seq:,} tokens ({completion} completion), {t.micro_batch_size * t.grad_accum} "
            f"completions per round, {t.micro_batch_size} per forward (2 steps): {_run_summary(run_dir)}; "
            f"estimated reserved {est.reserved_gib:.2f} GiB, total {est.total_gib:.2f} GiB")


STEPS = [("build", step_build, 120), ("train", step_train, 120), ("dpo", step_dpo, 120), ("phi4", step_phi4, 180),
         ("phi4_14b", step_phi4_14b, 480),
         ("grpo", step_grpo, 180), ("grpo_vllm", step_grpo_vllm, 240),
         ("packing", step_packing, 60), ("fp16", step_fp16, 90), ("grid", step_grid, 240), ("long", step_long, 120),
         ("merge", step_merge, 150), ("eval", step_eval, 150), ("speed", step_speed, 240)]


class Context:
    def __init__(self, args):
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.sizes = DRY_SIZES if self.dry else PHI3_MINI_SIZES
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model_dir = self.work / ("tiny-phi3" if self.dry else "phi3-mini-4k-random")
        self.long_model_dir = self.work / ("tiny-phi3-128k" if self.dry else "phi3-mini-128k-random")
        self.grid = (["lora.r=8", "data.max_seq_len=64"] if self.dry else
                     ["lora.r=8,16,64", "data.max_seq_len=512,2048,8192"])
        self.long_seq = 256 if self.dry else None
        # On the CPU the dry run keeps every step seconds long: no sample answers (greedy decoding token by token was
        # most of a one-step run's time there, in emulated fp16 above all), and one micro-batch per optimizer step
        # (the recipes' 4 were three quarters of the train, fp16, phi4 and phi4_14b steps' time).
        self.train_overrides = (["data.max_seq_len=128", "train.device=cpu", "train.sample_prompts=0",
                                 "train.grad_accum=1"] if self.dry else [])
        self.deadline = time.monotonic() + args.budget_s
        self._data = {}

    @property
    def data_path(self) -> Path:
        return self.long_data_path(128 if self.dry else 2048)

    def long_data_path(self, n_tokens: int) -> Path:
        if n_tokens not in self._data:
            from qlora_phi3.config import ModelConfig
            from qlora_phi3.data.synthetic import write_full_length_conversations
            from qlora_phi3.model.load import load_tokenizer

            path = self.work / f"chats-{n_tokens}.jsonl"
            write_full_length_conversations(path, load_tokenizer(ModelConfig(name_or_path=str(self.model_dir))), 48,
                                            n_tokens)
            self._data[n_tokens] = path
        return self._data[n_tokens]

    def pairs_path(self, n_tokens: int) -> Path:
        """Preference pairs whose chosen and rejected answers each fill ``n_tokens`` (the DPO step's worst case)."""
        from qlora_phi3.config import ModelConfig
        from qlora_phi3.data.synthetic import write_full_length_pairs
        from qlora_phi3.model.load import load_tokenizer

        path = self.work / f"pairs-{n_tokens}.jsonl"
        if not path.is_file():
            write_full_length_pairs(path, load_tokenizer(ModelConfig(name_or_path=str(self.model_dir))), 24, n_tokens)
        return path

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes (for the test suite)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for <gpu>.md")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "qlora-phi3-gpu-check"))
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting steps after this many seconds")
    p.add_argument("--only", nargs="+", choices=[s[0] for s in STEPS], help="run only these steps (build is implied)")
    args = p.parse_args(argv)

    import torch

    from qlora_phi3.run.record import device_info, package_versions
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU visible: run this on a GPU, or use --dry-run on the CPU.", file=sys.stderr)
        return 2
    global IN_PROCESS
    IN_PROCESS = args.dry_run
    ctx = Context(args)
    dev = device_info("cuda:0" if not args.dry_run else "cpu")
    name = "dry-run-cpu" if args.dry_run else dev["name"].replace(" ", "_").replace("/", "_")
    v = package_versions()
    report = Report(Path(args.out) / f"{name}.md", "\n".join([
        f"# qlora-phi3 GPU check on {dev['name']}{' (DRY RUN on the CPU: tiny sizes, not a measurement)' if ctx.dry else ''}",
        "",
        f"- hardware: {json.dumps(dev)}",
        f"- versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, trl {v['trl']}, "
        f"bitsandbytes {v['bitsandbytes']}, flash-attn {v['flash-attn']}",
        f"- command: `python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- model: random weights, shapes {json.dumps(ctx.sizes)}",
        ""]))
    t0 = time.monotonic()
    wanted = set(args.only or [s[0] for s in STEPS]) | {"build"}
    failed = 0
    for name, fn, typical_s in STEPS:
        if name not in wanted:
            continue
        if not ctx.dry and ctx.deadline - time.monotonic() < typical_s / 2:
            report.add(f"## {name}\n\nskipped: less time left than the step needs (--budget-s {args.budget_s:g}).")
            continue
        t = time.monotonic()
        try:
            text = fn(ctx)
            report.add(f"## {name} ({time.monotonic() - t:.0f} s)\n\n{text}")
        except Exception as e:  # noqa: BLE001 - recorded; the next step still runs
            failed += 1
            report.add(f"## {name} FAILED ({time.monotonic() - t:.0f} s)\n\n```\n{type(e).__name__}: {e}\n"
                       f"{traceback.format_exc()[-1500:]}```")
    report.add(f"total {time.monotonic() - t0:.0f} s, {failed} step(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
