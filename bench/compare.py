"""qlora-phi3 with its defaults versus the cookbook QLoRA pipeline, one pass over mixed-length chat data, CPU.

    python bench/compare.py --write          # ~10 minutes on 2 idle cores; --write saves bench/results/cpu_compare.md

Ours is ``qlora-phi3 train phi3_mini_4k_12gb`` as shipped: nothing tuned for the benchmark, only the model,
the data file, the run directory, the CPU and one epoch are set (the recipe's packing, micro-batch, accumulation,
learning rate, chunked loss, checkpointing and optimizer are its own). The reference is the cookbook's
notebook pipeline (bench/reference_pipeline.py): micro-batches of ``--micro-batch-ref`` (8) padded to their
longest sample, with the same LoRA, learning rate, optimizer, assistant-only labels and train/eval split.

The model is a "mini Phi-3": the real architecture, vocabulary (32064) and head dim (96), with fewer and
narrower layers and random weights (no download); the tokenizer is the shipped Phi-3 one. The data is a chat
set of mixed lengths (30 to ~1,900 tokens, median ~250) built from the bundled synthetic tasks. Each pipeline
runs in its own process, one after the other; peak memory is each process's sampled RSS (the same meter for
both), tokens/s counts real (non-padding) tokens over the whole pass.
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
    """Conversations of 1-3 question/answer pairs (25%), 6-20 (55%) and 30-90 (20%): about 30 to 1,900 tokens,
    median ~250, the shape of scraped multi-turn chat."""
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
            k = rng.randint(1, 3) if r < 0.25 else rng.randint(6, 20) if r < 0.8 else rng.randint(30, 90)
            messages = [msg for pair in rng.sample(pairs, k) for msg in pair]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


RECIPE = "phi3_mini_4k_12gb"


def _recipe(spec: dict, output_dir: str | None = None):
    """The shipped recipe with only what this machine and data need changed."""
    from qlora_phi3.config import load_recipe, resolve_recipe

    return load_recipe(resolve_recipe(RECIPE), [
        f"model.name_or_path={spec['model_dir']}", "model.revision=null", f"data.path={spec['data_path']}",
        "data.split=train", "data.eval_split=null", "data.eval_fraction=0.1", "data.max_eval_samples=8",
        f"train.output_dir={output_dir or spec['workdir'] + '/ours'}", "train.max_steps=-1", "train.epochs=1",
        "train.eval_steps=0", "train.save_steps=0", "train.logging_steps=1", "train.device=cpu"])


def _splits(spec: dict):
    from qlora_phi3.data.encode import encode_records
    from qlora_phi3.data.split import load_splits
    from qlora_phi3.model.load import load_tokenizer

    recipe = _recipe(spec)
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe.data, recipe.train.seed)
    return (encode_records(splits.train, tokenizer, recipe.data.max_seq_len),
            encode_records(splits.eval, tokenizer, recipe.data.max_seq_len), recipe)


def _worker(which: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if which == "ours":
        from qlora_phi3.run.train import train
        from qlora_phi3.ui import quiet_library_noise

        quiet_library_noise()
        result = train(_recipe(spec), force=True, cpu_memory="rss").run
        out = {"peak_gib": result["peak_memory"]["peak_allocated_gib"],
               "tokens_per_second": result["tokens_per_second"], "train_seconds": result["train_seconds"],
               "tokens": result["tokens"]["real_tokens"], "padded_tokens": result["tokens"]["padded_tokens"],
               "train_losses": [h["loss"] for h in result["history"] if "loss" in h],
               "eval_loss_end": result["eval_loss_end"], "steps": result["steps"]}
    else:
        from bench.reference_pipeline import run_reference

        train_enc, eval_enc, recipe = _splits(spec)
        out = run_reference(spec["model_dir"], train_enc, eval_enc, micro_batch_size=spec["micro_batch_ref"],
                            grad_accum=1, epochs=1, lr=recipe.train.lr, lora=recipe.lora,
                            optimizer=recipe.train.optimizer, seed=recipe.train.seed,
                            output_dir=spec["workdir"] + "/reference")
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
    recipe = spec["recipe"]
    rows = [
        ("real tokens / s (one pass)", f"{ref['tokens_per_second']:.0f}", f"{ours['tokens_per_second']:.0f}",
         f"**{ours['tokens_per_second'] / ref['tokens_per_second']:.2f}x**"),
        ("wall time of the pass (s)", f"{ref['train_seconds']:.0f}", f"{ours['train_seconds']:.0f}",
         f"{ours['train_seconds'] / ref['train_seconds']:.2f}x"),
        ("padding share of the computed tokens", f"{ref['padded_tokens'] / (ref['padded_tokens'] + ref['tokens']):.0%}",
         f"{ours['padded_tokens'] / (ours['padded_tokens'] + ours['tokens']):.0%}", ""),
        ("peak memory (RSS, GiB)", f"{ref['peak_gib']:.2f}", f"{ours['peak_gib']:.2f}",
         f"{ours['peak_gib'] / ref['peak_gib']:.2f}x"),
        ("optimizer steps", f"{ref['steps']}", f"{ours['steps']}", ""),
        ("eval loss after the pass (per assistant token)", f"{ref['eval_loss_end']:.4f}", f"{ours['eval_loss_end']:.4f}",
         f"{ours['eval_loss_end'] - ref['eval_loss_end']:+.4f}"),
    ]
    lines = ["| metric | reference (cookbook) | qlora-phi3 defaults | ours / reference |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    setup = (f"mini Phi-3 ({spec['layers']} layers, hidden {spec['hidden']}, MLP {spec['intermediate']}, vocab 32064, "
             f"head dim 96, random weights); {spec['n_train']} train conversations of {spec['min_len']}-"
             f"{spec['max_len']} tokens (median {spec['median_len']}), one pass. Ours: `{RECIPE}` as shipped "
             f"(packing {recipe['packing']}, micro-batch {recipe['micro_batch_size']} x grad_accum "
             f"{recipe['grad_accum']}, max_seq_len {recipe['max_seq_len']}, lr {recipe['lr']}, chunked loss "
             f"{recipe['loss_chunk_tokens']}); reference: micro-batch {spec['micro_batch_ref']} padded to its longest, "
             "grad_accum 1, same LoRA, lr, optimizer and split.")
    return "\n".join([f"Hardware: {hardware}. Command: `{command}`", "", setup, "", *lines]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384, help="multiple of 96 (Phi-3's head dim)")
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--conversations", type=int, default=106, help="96 train + 10 held out for eval")
    p.add_argument("--micro-batch-ref", type=int, default=8, help="reference micro-batch (padded to its longest)")
    p.add_argument("--workdir", type=Path, default=None, help="keep models, data and logs here (default: temp dir)")
    p.add_argument("--write", action="store_true", help="write bench/results/cpu_compare.md")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.spec)
        return 0
    from rich.console import Console

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
            "hidden": a.hidden, "intermediate": a.intermediate, "micro_batch_ref": a.micro_batch_ref}
    train_enc, _, recipe = _splits(spec)
    lengths = sorted(len(x) for x in train_enc.input_ids)
    spec.update(n_train=len(lengths), min_len=lengths[0], max_len=lengths[-1], median_len=lengths[len(lengths) // 2],
                recipe={"packing": recipe.data.packing, "micro_batch_size": recipe.train.micro_batch_size,
                        "grad_accum": recipe.train.grad_accum, "max_seq_len": recipe.data.max_seq_len,
                        "lr": recipe.train.lr, "loss_chunk_tokens": recipe.train.loss_chunk_tokens})
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    ref = _run_worker("reference", spec_path, console)
    ours = _run_worker("ours", spec_path, console)
    cpu = device_info("cpu")
    load = os.getloadavg()[0]
    hardware = (f"{cpu['cores']}-core CPU ({cpu['name']}, {cpu['ram_gib']} GiB RAM), no GPU; load average "
                f"{load:.1f} at the end")
    command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = _table(spec, ours, ref, hardware, command.strip())
    console.print(table)
    if a.write:
        out = REPO / "bench" / "results" / "cpu_compare.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / "cpu_compare.json").write_text(json.dumps({"spec": spec, "ours": ours, "reference": ref,
                                                                  "hardware": hardware, "command": command},
                                                                 indent=1) + "\n")
        out.write_text("# qlora-phi3 defaults vs the cookbook QLoRA pipeline, CPU\n\n" + table)
        console.print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
