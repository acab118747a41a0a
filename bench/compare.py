"""Ours versus the cookbook QLoRA pipeline, side by side in one command, on a "mini Phi-3" on the CPU.

    python bench/compare.py --write               # defaults below, ~10 minutes on 2 cores; --write saves the table
    python bench/compare.py --steps 8 --grad-accum 2 --layers 4 --hidden 768   # bigger

The mini Phi-3 has the real architecture, vocabulary (32064) and head dim (96), with fewer and
narrower layers and random weights (no download); the tokenizer is the embedded tiny one, its ids
fit inside the padded vocabulary. The data is a chat set with mixed lengths (most conversations a
few turns, some filling the whole context), built from the bundled synthetic tasks.

Both pipelines train the same LoRA (r, alpha, fused targets), on the same train/eval split with the
same assistant-only labels, optimizer, learning rate and number of optimizer steps, with about the
same real tokens per optimizer step (ours: packed rows of max_seq_len; the reference: micro-batches
padded to their longest sample, with grad_accum scaled to match). Each runs in its own process, so
neither inherits the other's memory. Peak memory on the CPU is qlora_phi3.memory.meter.PeakMemory's live
tensor bytes (weights included), measured the same way for both; tokens/s counts non-padding tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["build_chat_set", "build_mini_phi3", "main"]


def build_mini_phi3(out_dir: Path, layers: int, hidden: int, intermediate: int, seed: int = 0) -> Path:
    """Phi-3 architecture, vocab 32064, head dim 96, random bf16 weights, the shipped Phi-3 tokenizer."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from qlora_phi3.model.tiny import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Phi3Config(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=hidden // 96, num_key_value_heads=hidden // 96,
                        max_position_embeddings=4096, original_max_position_embeddings=4096, bos_token_id=1,
                        eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_chat_set(path: Path, n: int, seed: int = 0) -> Path:
    """Conversations of 1-4 question/answer pairs (70%), 10-30 (20%) and 60-120 (10%, most over 2k tokens)."""
    from qlora_phi3.data.synthetic import generate

    rng = random.Random(seed)
    pairs = []
    for record in generate(4000, seed=seed):
        m = record["messages"]
        pairs.extend(m[i:i + 2] for i in range(len(m) - 1)
                     if m[i]["role"] == "user" and m[i + 1]["role"] == "assistant")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            r = rng.random()
            k = rng.randint(1, 4) if r < 0.7 else rng.randint(10, 30) if r < 0.9 else rng.randint(60, 120)
            messages = [msg for pair in rng.sample(pairs, k) for msg in pair]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def _splits(spec: dict):
    from qlora_phi3.config import load_recipe
    from qlora_phi3.data.read import load_records
    from qlora_phi3.data.encode import encode_records, split_records
    from qlora_phi3.model.load import load_tokenizer

    recipe = load_recipe(None, _our_overrides(spec))
    tokenizer = load_tokenizer(recipe.model)
    records, _ = load_records(recipe.data)
    train_recs, eval_recs = split_records(records, recipe.data.eval_fraction, recipe.data.max_eval_samples,
                                          recipe.train.seed)
    return (encode_records(train_recs, tokenizer, spec["max_seq_len"]),
            encode_records(eval_recs, tokenizer, spec["max_seq_len"]))


def _our_overrides(spec: dict, output_dir: str | None = None) -> list[str]:
    return [f"model.name_or_path={spec['model_dir']}", f"data.path={spec['data_path']}",
            f"data.max_seq_len={spec['max_seq_len']}", "data.eval_fraction=0.1", "data.max_eval_samples=8",
            "data.packing=true", "lora.dropout=0.0", "model.attn_implementation=sdpa",
            f"train.output_dir={output_dir or spec['workdir'] + '/ours'}", f"train.max_steps={spec['steps']}",
            "train.micro_batch_size=1", f"train.grad_accum={spec['grad_accum_ours']}", f"train.lr={spec['lr']}",
            "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.optimizer=paged_adamw_8bit",
            "train.logging_steps=1", "train.eval_steps=0", "train.save_steps=0", "train.device=cpu",
            f"train.gradient_checkpointing={spec['gradient_checkpointing']}",
            f"train.loss_chunk_tokens={spec['loss_chunk_tokens']}", "train.seed=0"]


def _our_probe(spec: dict, model) -> float:
    """Our side of reference_pipeline.probe_peak_gib: one micro-step on a packed row holding the longest sample."""
    from bench.reference_pipeline import probe_peak_gib
    from qlora_phi3.config import load_recipe
    from qlora_phi3.data.encode import EncodedSplit
    from qlora_phi3.model.load import load_tokenizer
    from qlora_phi3.data.packing import pack_columns
    from qlora_phi3.run.train import _sft_config
    from qlora_phi3.run.trainer import build_trainer

    recipe = load_recipe(None, _our_overrides(spec, spec["workdir"] + "/ours-probe"))
    tokenizer = load_tokenizer(recipe.model)
    train_enc, eval_enc = _splits(spec)
    rows = pack_columns(train_enc.input_ids, train_enc.labels, spec["max_seq_len"])
    full = max(range(len(rows["input_ids"])), key=lambda r: len(rows["input_ids"][r]))
    trainer, _, meter = build_trainer(model, tokenizer, _sft_config(recipe, "cpu", "bfloat16"), train_enc, eval_enc,
                                      "cpu", packing_max_seq_len=spec["max_seq_len"],
                                      loss_chunk_tokens=spec["loss_chunk_tokens"])
    meter.close()
    # The packed row is fed as one "sample" with its seq_lens: the collator builds the leak-free mask.
    row = EncodedSplit([rows["input_ids"][full]], [rows["labels"][full]], ["probe"])
    collate = trainer.data_collator
    trainer.data_collator = lambda feats: collate([{**feats[0], "seq_lens": rows["seq_lens"][full]}])
    return probe_peak_gib(trainer, row)


def _worker(which: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if which == "ours":
        from qlora_phi3.config import load_recipe
        from qlora_phi3.run.train import train

        # Measured the way the reference is (live tensors, same per-operator overhead on both sides);
        # `qlora-phi3 train` on a CPU shows sampled RSS instead, for speed.
        run_result = train(load_recipe(None, _our_overrides(spec)), force=True, cpu_memory="tensors")
        result = run_result.run
        probe = _our_probe(spec, run_result.model)
        out = {"peak_allocated_gib": max(result["peak_memory"]["peak_allocated_gib"], probe), "probe_peak_gib": probe,
               "tokens_per_second": result["tokens_per_second"], "train_seconds": result["train_seconds"],
               "tokens": round(result["tokens_per_second"] * result["train_seconds"]),
               "train_losses": [h["loss"] for h in result["history"] if "loss" in h],
               "eval_loss_end": result["eval_loss_end"], "steps": result["steps"]}
    else:
        from bench.reference_pipeline import run_reference
        from qlora_phi3.config import load_recipe

        recipe = load_recipe(None, _our_overrides(spec))
        train_enc, eval_enc = _splits(spec)
        out = run_reference(spec["model_dir"], train_enc, eval_enc, micro_batch_size=spec["micro_batch_ref"],
                            grad_accum=spec["grad_accum_ref"], steps=spec["steps"], lr=spec["lr"], lora=recipe.lora,
                            optimizer="paged_adamw_8bit", seed=0, output_dir=spec["workdir"] + "/reference")
    (spec_path.parent / f"{which}.json").write_text(json.dumps(out, indent=1))


def _run_worker(which: str, spec_path: Path, console) -> dict:
    log = spec_path.parent / f"{which}.log"
    with console.status(f"training {which} (log: {log})"), open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", which, "--spec", str(spec_path)],
                              stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return json.loads((spec_path.parent / f"{which}.json").read_text())


def _table(spec: dict, ours: dict, ref: dict, hardware: str, command: str) -> str:
    def last(r):
        tail = r["train_losses"][-2:]
        return sum(tail) / len(tail)

    rows = [
        (f"peak memory (live tensors, GiB; incl. one {spec['max_seq_len']}-token micro-step)", f"{ref['peak_allocated_gib']:.3f}", f"{ours['peak_allocated_gib']:.3f}",
         f"{ours['peak_allocated_gib'] / ref['peak_allocated_gib']:.2f}x"),
        ("real tokens / s", f"{ref['tokens_per_second']:.0f}", f"{ours['tokens_per_second']:.0f}",
         f"{ours['tokens_per_second'] / ref['tokens_per_second']:.2f}x"),
        ("real tokens per optimizer step", f"{ref['tokens'] / ref['steps']:.0f}", f"{ours['tokens'] / ours['steps']:.0f}",
         f"{(ours['tokens'] / ours['steps']) / (ref['tokens'] / ref['steps']):.2f}x"),
        (f"train loss, mean of steps {spec['steps'] - 1}-{spec['steps']}", f"{last(ref):.4f}", f"{last(ours):.4f}",
         f"{last(ours) - last(ref):+.4f}"),
        (f"eval loss after {spec['steps']} steps", f"{ref['eval_loss_end']:.4f}", f"{ours['eval_loss_end']:.4f}",
         f"{ours['eval_loss_end'] - ref['eval_loss_end']:+.4f}"),
    ]
    lines = ["| metric | reference (cookbook) | qlora-phi3 | ours / reference |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    setup = (f"mini Phi-3 ({spec['layers']} layers, hidden {spec['hidden']}, MLP {spec['intermediate']}, vocab 32064, "
             f"head dim 96, random weights), data.max_seq_len={spec['max_seq_len']}, LoRA r=16 on the fused targets, "
             f"{spec['steps']} optimizer steps; ours: packed rows, micro-batch 1 x grad_accum {spec['grad_accum_ours']}, "
             f"chunked loss ({spec['loss_chunk_tokens']} tokens), gradient_checkpointing={spec['gradient_checkpointing']}; "
             f"reference: micro-batch {spec['micro_batch_ref']} padded to longest x grad_accum {spec['grad_accum_ref']}. "
             f"{spec['n_train']} train conversations, {spec['min_len']}-{spec['max_len']} tokens "
             f"(median {spec['median_len']}).")
    return "\n".join([f"Hardware: {hardware}. Command: `{command}`", "", setup, "", *lines]) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384, help="multiple of 96 (Phi-3's head dim)")
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=1, help="ours: packed rows per optimizer step")
    p.add_argument("--micro-batch-ref", type=int, default=1, help="reference micro-batch (padded to longest)")
    p.add_argument("--conversations", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss-chunk-tokens", type=int, default=256)
    p.add_argument("--gradient-checkpointing", default="true", choices=["true", "offload"])
    p.add_argument("--workdir", type=Path, default=None, help="keep models, data and logs here (default: temp dir)")
    p.add_argument("--write", action="store_true", help="write bench/results/cpu_compare.md")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.spec)
        return 0
    from rich.console import Console

    from qlora_phi3.data.packing import pack_rows
    from qlora_phi3.run.record import device_info

    console = Console()
    if a.hidden % 96:
        p.error("--hidden must be a multiple of 96")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="qlora-phi3-compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "mini-phi3"
    with console.status("building the mini Phi-3 and the mixed-length chat set"):
        build_mini_phi3(model_dir, a.layers, a.hidden, a.intermediate)
        data_path = build_chat_set(workdir / "chats.jsonl", a.conversations)
    spec = {"model_dir": str(model_dir), "data_path": str(data_path), "workdir": str(workdir), "layers": a.layers,
            "hidden": a.hidden, "intermediate": a.intermediate, "max_seq_len": a.max_seq_len, "steps": a.steps,
            "grad_accum_ours": a.grad_accum, "micro_batch_ref": a.micro_batch_ref, "lr": a.lr,
            "loss_chunk_tokens": a.loss_chunk_tokens, "gradient_checkpointing": a.gradient_checkpointing}
    train_enc, _ = _splits(spec)
    lengths = sorted(len(x) for x in train_enc.input_ids)
    rows = pack_rows(lengths, a.max_seq_len)
    tokens_per_row = sum(lengths) / len(rows)
    # Same real tokens per optimizer step: the reference's samples per step replace our packed rows.
    spec["grad_accum_ref"] = max(1, round(a.grad_accum * tokens_per_row / (a.micro_batch_ref * sum(lengths) / len(lengths))))
    spec.update(n_train=len(lengths), min_len=lengths[0], max_len=lengths[-1], median_len=lengths[len(lengths) // 2])
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    ref = _run_worker("reference", spec_path, console)
    ours = _run_worker("ours", spec_path, console)
    hardware = f"{os.cpu_count()}-core CPU ({_cpu_name()}, {device_info('cpu')['ram_gib']} GiB RAM), no GPU"
    command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = _table(spec, ours, ref, hardware, command.strip())
    console.print(table)
    if a.write:
        out = REPO / "bench" / "results" / "cpu_compare.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Ours vs the cookbook QLoRA pipeline, CPU\n\n" + table)
        console.print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
