"""qlora-phi3's DPO recipe versus a plain TRL DPOTrainer + PEFT + bitsandbytes pipeline, same model and pairs, CPU.

    OMP_NUM_THREADS=1 python bench/dpo_compare.py --write   # ~10-20 minutes on 2 shared cores; writes
                                                             # bench/results/cpu_dpo_compare.{md,json}

Ours is ``qlora-phi3 train phi3_mini_4k_12gb_dpo`` (data pre-tokenized with Phi-3's template, label-only chunked
answer log-probs, reference = 4-bit base with the adapter off, LoRA fp32, 8-bit paged AdamW). The reference is what
TRL's documentation teaches for QLoRA DPO: NF4 + double quantization, ``prepare_model_for_kbit_training``, a
``LoraConfig`` handed to ``DPOTrainer`` (which wraps the model and uses it with the adapter off as the reference),
TRL's own tokenization of the same conversational pairs and its fused LM head. Both get the same mini Phi-3, pairs,
LoRA (fused Phi-3 targets), learning rate, optimizer, micro-batch, accumulation and steps.

The model is a "mini Phi-3" (bench/compare.py): the real architecture, vocabulary (32,064) and head dim (96), two
narrow layers, random weights. Every pair has a short prompt and a chosen and a rejected answer so that each row
(prompt + answer) is 1,024-2,048 tokens. Each pipeline runs in its own process. Memory: sampled RSS, the same meter
for both; "over the loaded model" is the training peak minus the RSS just before the first step (model, adapter and
trainer built), i.e. what training itself adds. Tokens/s: real (non-padding) tokens of both rows of every pair over
the training time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["build_pairs", "main"]


def build_pairs(path: Path, tokenizer, n: int, seed: int = 0) -> Path:
    """``n`` conversational pairs; each row (prompt + chosen, prompt + rejected) is 1,024-2,048 tokens."""
    from qlora_phi3.data.synthetic import _question, answer_for, wrong_answer_for, write_jsonl

    rng = random.Random(seed)
    sentences = [answer_for(_question(rng)) for _ in range(256)]
    per_sentence = len(tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]) / len(sentences)
    rows = []
    for i in range(n):
        question = _question(rng)
        prompt = f"Set {i}. " + " ".join(rng.choice(sentences) for _ in range(int(80 / per_sentence))) + " " + question
        target = rng.randint(1024, 2048) - 120  # answer tokens so the row lands in 1,024-2,048
        filler = " ".join(rng.choice(sentences) for _ in range(int(target / per_sentence)))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": f"{answer_for(question)} {filler}"}],
                     "rejected": [{"role": "assistant", "content": f"{wrong_answer_for(question, rng)} {filler}"}]})
    write_jsonl(path, rows)
    return path


def _ours(args) -> dict:
    from bench.pipelines import note_rss_at_meter_reset
    from qlora_phi3.config import load_recipe
    from qlora_phi3.run.train import train
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    loaded = note_rss_at_meter_reset()
    recipe = load_recipe("phi3_mini_4k_12gb_dpo", [
        f"model.name_or_path={args.model}", "model.revision=null", f"data.path={args.data}", "data.eval_split=null",
        "data.max_eval_samples=1", "data.eval_fraction=0.01", "data.max_seq_len=2048", "data.max_prompt_len=null",
        f"train.output_dir={args.workdir}/ours", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro}",
        f"train.grad_accum={args.accum}", f"train.lr={args.lr}", "train.eval_steps=0", "train.save_steps=0",
        "train.sample_prompts=0", "train.logging_steps=1", "train.device=cpu",
        f"train.loss_chunk_tokens={args.chunk}"])
    result = train(recipe, force=True)
    run = result.run
    return {"loaded_gib": loaded["rss"] / 2**30, "peak_gib": run["peak_memory"]["peak_allocated_gib"],
            "tokens": run["tokens"]["real_tokens"], "train_seconds": run["train_seconds"],
            "tokens_per_second": run["tokens_per_second"], "steps": run["steps"],
            "losses": [h["loss"] for h in run["history"] if "loss" in h]}


def _reference(args) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from bench.pipelines import train_reference
    from qlora_phi3.model.load import _keep_cpu_4bit_format

    transformers.set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.unk_token
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"}, attn_implementation="sdpa")
    _keep_cpu_4bit_format(model)  # CPU-only bitsandbytes quirk (qlora_phi3.model.load); no effect on a GPU
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    config = DPOConfig(output_dir=f"{args.workdir}/reference", max_steps=args.steps,
                       per_device_train_batch_size=args.micro, gradient_accumulation_steps=args.accum,
                       learning_rate=args.lr, lr_scheduler_type="cosine", optim="paged_adamw_8bit",
                       gradient_checkpointing=True, bf16=True, use_cpu=True, seed=42, logging_steps=1,
                       eval_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, max_length=2048,
                       beta=0.1, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                                                task_type="CAUSAL_LM",
                                                target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    out = train_reference(trainer)
    return out | {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def _worker(which: str, args) -> int:
    out = (_ours if which == "ours" else _reference)(args)
    Path(args.result).write_text(json.dumps(out))
    return 0


def main(argv=None) -> int:
    from bench.pipelines import add_pipeline_args, compare_summary, run_pipelines, write_compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro", type=int, default=1, help="pairs per micro-batch (2 rows each)")
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-6)
    add_pipeline_args(p, "dpo")
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args)

    from bench.compare import build_mini_phi3
    from qlora_phi3.run.record import package_versions
    from transformers import AutoTokenizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "mini-phi3"
    if not (model / "config.json").is_file():
        build_mini_phi3(model, layers=2, hidden=384, intermediate=1024)
    data = build_pairs(work / "pairs.jsonl", AutoTokenizer.from_pretrained(model),
                       n=args.steps * args.micro * args.accum + 4)
    results = run_pipelines(__file__, args, model, data, [
        "--steps", str(args.steps), "--micro", str(args.micro), "--accum", str(args.accum), "--lr", str(args.lr),
        "--chunk", str(args.chunk)])
    if results is None:
        return 1
    summary = compare_summary(args, results, package_versions())
    ref, ours, over = summary["reference"], summary["ours"], summary["over_loaded_gib"]
    print(json.dumps(summary, indent=1))
    if args.write:
        hw = summary["hardware"]
        v = summary["versions"]
        lines = [
            "# qlora-phi3 DPO vs plain TRL DPOTrainer + PEFT + bitsandbytes, CPU", "",
            f"Hardware: {hw['cpu']}, {hw['cores']} cores, bf16 flags: {hw['bf16_flags']}; load average at the end "
            f"{', '.join(f'{x:.1f}' for x in hw['load_average'])} (shared box). Versions: torch {v['torch']}, "
            f"transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}, bitsandbytes {v['bitsandbytes']}.",
            f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} python bench/dpo_compare.py "
            f"--steps {args.steps} --micro {args.micro} --accum {args.accum} --chunk {args.chunk} --write`"
            + (" (the reference's result kept from the previous run in the same workdir: --reuse-reference)"
               if args.reuse_reference else ""), "",
            f"mini Phi-3 (2 layers, hidden 384, MLP 1024, vocab 32,064, head dim 96, random weights); pairs whose rows "
            f"are 1,024-2,048 tokens; {args.steps} optimizer steps of {args.micro} pair(s) x {args.accum} "
            f"accumulation; lr {args.lr:g}; LoRA r=16 on the fused targets; paged 8-bit AdamW; bf16 autocast.", "",
            "| metric | plain TRL + PEFT | qlora-phi3 | ours / reference |", "|---|---:|---:|---:|",
            f"| RSS with the model loaded, before step 1 (GiB) | {ref['loaded_gib']:.3f} | {ours['loaded_gib']:.3f} | |",
            f"| peak RSS while training (GiB) | {ref['peak_gib']:.3f} | {ours['peak_gib']:.3f} | "
            f"{ours['peak_gib'] / ref['peak_gib']:.2f}x |",
            f"| training memory over the loaded model (GiB) | {over['reference']:.3f} | {over['ours']:.3f} | "
            f"**{summary['training_memory_ratio']:.2f}x** |",
            f"| real tokens / s | {ref['tokens_per_second']:.0f} | {ours['tokens_per_second']:.0f} | "
            f"{summary['speed_ratio']:.2f}x |",
            f"| training seconds | {ref['train_seconds']:.0f} | {ours['train_seconds']:.0f} | |",
            f"| real tokens trained (each pipeline's own count) | {ref['tokens']:,} | {ours['tokens']:,} | |",
            f"| DPO loss per step | {', '.join(f'{x:.4f}' for x in ref['losses'])} | "
            f"{', '.join(f'{x:.4f}' for x in ours['losses'])} | |", "",
            "Notes: the reference's extra memory is TRL's fused LM head, which on a device without Triton scores every "
            "position of both rows (prompt and padding included) in 4,096-position tiles with fp32 folding, plus "
            "prepare_model_for_kbit_training's fp32 copies of the embeddings and lm_head; ours projects only answer "
            "positions, 256 at a time. The two pipelines draw their pairs from the same file in their own order (ours holds "
            "one pair out for its eval split), so their token counts differ a little; tokens/s is each one's own count "
            "over its own training time. CPU timings on a shared 2-core box are noisy; no GPU figure is claimed here."]
        write_compare("dpo", summary, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
