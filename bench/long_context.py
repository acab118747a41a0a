"""Long context on the CPU, per token: live-tensor peak of real training steps with sequence tiling off and on.

    nice -n 10 python bench/long_context.py --write            # 2k, 4k, 8k, 16k tokens x tiling off/on, 1 layer
    python bench/long_context.py --seqs 2048                   # a quick look
    nice -n 10 python bench/long_context.py --speed 4096 --write  # tokens/s tiling off vs on, interleaved
    python bench/long_context.py --predict                     # the estimator on full Phi-3-mini-128k (no run)
    python bench/long_context.py --render                      # the table again from the JSON, current estimator

The model has Phi-3-mini's real widths (hidden 3072, MLP 8192, 32 heads of 96, vocabulary 32064) with
``--layers`` layers and random weights (no download); the tokenizer is the embedded tiny one. The data is
generated: long conversations (a ~200-token user turn, a short assistant answer, repeated), truncated
to exactly ``data.max_seq_len`` tokens, so every step is one row of that many tokens.

Each configuration runs in its own process through ``qlora_phi3.run.train.train(recipe,
cpu_memory="tensors")``: the trainer users run (4-bit base, LoRA r=16 on the fused targets, paged 8-bit
AdamW, checkpointing, chunked loss), ``--steps`` optimizer steps (default 1: on 2 shared cores a 16k-token
step of one full-width layer takes minutes; the LoRA optimizer states the first step allocates are a few MB),
and ``peak_memory`` is read from its run.json (the peak of live tensor storage from the start of training,
the step-0 eval of one short conversation included). Step seconds come from the run's logged tokens/s.
``--write`` saves ``bench/results/cpu_long_context.md`` (the table) and ``.json`` (the rows, which
tests/unit/memory/test_estimate.py checks the estimator against).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["build_long_chats", "build_model", "estimate_row", "fit_slope", "main", "predict_rows", "render"]

RESULTS = REPO / "bench" / "results"
WIDTHS = dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
              vocab_size=32064)
TILE_TOKENS = 4096 // 4  # 1024: a tile well below every measured length, so even 2k runs two tiles


def build_model(out_dir: Path, layers: int, max_positions: int, **widths) -> Path:
    """Random Phi-3 with the given widths (default Phi-3-mini's), saved with the embedded tiny tokenizer."""
    from transformers import AutoTokenizer

    from qlora_phi3.model.tiny import TINY_MODEL_DIR
    from qlora_phi3.model.tiny import write_random_phi3

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    write_random_phi3(out_dir, **{**WIDTHS, **widths}, num_hidden_layers=layers, max_position_embeddings=max_positions,
                      original_max_position_embeddings=max_positions, pad_token_id=eos, eos_token_id=eos)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_long_chats(path: Path, min_tokens: int, seed: int = 0) -> Path:
    """Two conversations of more than ``min_tokens`` tokens (for training) and one short one, placed where the
    recipe's seeded split holds one out (eval stays cheap: evaluating a long row would double the run)."""
    import random

    from qlora_phi3.data.split import hold_out
    from qlora_phi3.data.synthetic import generate

    rng = random.Random(seed)
    turns = [m["content"] for rec in generate(400, seed=seed) for m in rec["messages"]]
    chars_per_pair = 30 * 22  # ~30 short questions per user turn, ~4.7 characters per tiny-tokenizer token

    def long_conversation():
        messages = []
        for _ in range(min_tokens * 5 // chars_per_pair + 20):
            messages.append({"role": "user", "content": " ".join(rng.choices(turns, k=30))})
            messages.append({"role": "assistant", "content": rng.choice(turns)})
        return {"messages": messages}

    records = [long_conversation() for _ in range(3)]
    _, held = hold_out([0, 1, 2], 0.05, 1, seed)  # the indices the recipe's seeded split holds out
    records[held[0]] = {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                                     {"role": "assistant", "content": "2 plus 2 is 4."}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _overrides(model_dir: Path, data: Path, out: Path, seq: int, tile: int, attn: str = "sdpa",
               steps: int = 1) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"model.attn_implementation={attn}", f"data.path={data}",
            f"data.max_seq_len={seq}", "data.eval_fraction=0.05", "data.max_eval_samples=1", "data.packing=false",
            "lora.r=16", "lora.dropout=0.05", f"train.output_dir={out}", f"train.max_steps={steps}",
            "train.micro_batch_size=1", "train.grad_accum=1", "train.optimizer=paged_adamw_8bit",
            "train.gradient_checkpointing=true", "train.loss_chunk_tokens=256", f"train.tile_tokens={tile}",
            "train.logging_steps=1", "train.eval_steps=0", "train.save_steps=0", "train.device=cpu",
            "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.seed=0"]


def _worker(spec_path: Path) -> None:
    """One configuration, in this process: train, then print the row as JSON on the last line."""
    from qlora_phi3.config import load_recipe
    from qlora_phi3.run.train import train
    from qlora_phi3.ui import quiet_library_noise

    spec = json.loads(spec_path.read_text())
    quiet_library_noise()
    recipe = load_recipe(None, spec["overrides"])
    run = train(recipe, force=True, cpu_memory="tensors").run
    hist = {h["step"]: h["tokens_per_second"] for h in run["history"] if "loss" in h}
    seq = recipe.data.max_seq_len
    # tokens/s in the history are cumulative from the start of training (the step-0 eval, one short conversation,
    # included): with 2 steps the second alone is the difference
    step2_s = 2 * seq / hist[2] - seq / hist[1] if 2 in hist else seq / hist[1]
    row = {"seq": seq, "tile_tokens": recipe.train.tile_tokens, "layers": spec["layers"],
           "peak_gib": round(run["peak_memory"]["peak_allocated_gib"], 4), "step_seconds": round(step2_s, 1),
           "tokens_per_second": round(seq / step2_s, 1), "train_seconds": run["train_seconds"],
           "forward_autocast": True,  # the trainer runs the forward (chunked loss included) under autocast
           "compute_dtype": run["compute_dtype"]}
    print(json.dumps(row))


def estimate_row(row: dict):
    """The estimator for a measured row's settings (CPU: tensor bytes), from the model's shapes alone. Rows without
    ``forward_autocast`` were measured before the trainer put the chunked loss's forward under autocast (PEFT then
    ran the adapters in fp32), and are estimated for that path. Rows without ``compute_dtype`` were measured in bf16
    (auto picked it on every CPU then, the EPYC's emulated bf16 included)."""
    from transformers import Phi3Config

    from qlora_phi3.config import load_recipe
    from qlora_phi3.memory.estimate import estimate

    config = Phi3Config(**WIDTHS, num_hidden_layers=row["layers"], max_position_embeddings=max(row["seq"], 4096),
                        tie_word_embeddings=False, sliding_window=None)
    recipe = load_recipe(None, _overrides(Path("unused"), Path("unused"), Path("unused"), row["seq"],
                                          row["tile_tokens"]))
    return estimate(recipe, config, "cpu", autocast=row.get("forward_autocast", False),
                    compute_dtype=row.get("compute_dtype", "bfloat16"))


def speed(seq: int, tile: int, layers: int, repeats: int) -> dict:
    """Tokens/s of one training step (forward + backward, the trainer's model and loss) with tiling off and on,
    interleaved off/on/off/on in one process, so that load from other jobs on a shared machine hits both alike."""
    import statistics

    import torch

    from qlora_phi3.config import LoraSettings, ModelConfig
    from qlora_phi3.model.load import load_model
    from qlora_phi3.model.lora import attach_lora
    from qlora_phi3.run.loss import model_loss
    from qlora_phi3.run.tiling import disable_tiling, enable_tiling

    with tempfile.TemporaryDirectory(prefix="qlora-speed-") as tmp:
        model_dir = build_model(Path(tmp) / "model", layers, max(seq, 4096))
        model = attach_lora(load_model(ModelConfig(name_or_path=str(model_dir)), "cpu", "bfloat16", "sdpa"),
                            LoraSettings(r=16, dropout=0.05))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ids = torch.randint(3, 600, (1, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, ::30] = ids[0, ::30]  # ~3% labelled, like the generated chats
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    seconds = {0: [], tile: []}
    for k in range(2 * repeats + 1):
        t = tile if k % 2 else 0
        enable_tiling(model, t) if t else disable_tiling(model)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it
            loss = model_loss(model, batch, 256)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if k:  # the first step warms up
            seconds[t].append(time.perf_counter() - t0)
    return {t: round(seq / statistics.median(v), 1) for t, v in seconds.items()}


def fit_slope(rows: list[dict]) -> tuple[float, float]:
    """Least-squares (bytes per token, intercept GiB) of peak against tokens."""
    xs, ys = [r["seq"] for r in rows], [r["peak_gib"] for r in rows]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope * 1024**3, my - slope * mx


def predict_rows(seqs=(32768, 65536, 131072)) -> list[tuple[str, int, object]]:
    """The estimator on full Phi-3-mini-128k for the shipped long-context recipes' settings at each length."""
    from qlora_phi3.config import load_recipe, recipes_dir
    from qlora_phi3.memory.estimate import config_for_estimate, estimate

    out = []
    for name in ("phi3_mini_128k_12gb.yaml", "phi3_mini_128k_8gb.yaml"):
        for seq in seqs:
            recipe = load_recipe(recipes_dir() / name, [f"data.max_seq_len={seq}"])
            out.append((name, seq, estimate(recipe, config_for_estimate(recipe.model), "cuda")))
    return out


def _hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), no GPU"


def _markdown(rows: list[dict], layers: int, command: str, hardware: str | None = None,
              speed_result: dict | None = None) -> str:
    import torch
    import transformers

    lines = ["# Long context on the CPU: live-tensor peak per token, sequence tiling off and on", "",
             f"- hardware: {hardware or _hardware()}; torch {torch.__version__}, transformers {transformers.__version__}",
             f"- command: `{command}`",
             f"- model: Phi-3 with Phi-3-mini's widths (hidden 3072, MLP 8192, 32 heads x 96, vocab 32064), {layers} "
             "layers, random weights, 4-bit NF4 base; LoRA r=16 (dropout 0.05) on qkv/o/gate_up/down; paged 8-bit "
             "AdamW; checkpointing on; chunked loss (256); sdpa; one unpacked row of `seq` tokens per step",
             "- measured: `qlora_phi3.run.train.train(recipe, cpu_memory=\"tensors\")`, one process per row, "
             "`peak_memory` from run.json (live tensor storage, weights included); step s from the run's tokens/s "
             "(the last step's)",
             "- estimated: `qlora_phi3.memory.estimate.estimate(recipe, config, \"cpu\")` (tensor bytes); "
             "error = (estimated - measured) / measured",
             "",
             "| seq | tile_tokens | peak GiB (measured) | estimated GiB | error | step s | tokens/s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        estimated = estimate_row(r).tensor_gib
        err = 100 * (estimated - r["peak_gib"]) / r["peak_gib"]
        lines.append(f"| {r['seq']} | {r['tile_tokens'] or 'off'} | {r['peak_gib']:.3f} | {estimated:.3f} | "
                     f"{err:+.1f}% | {r['step_seconds']:.1f} | {r['tokens_per_second']:.0f} |")
    lines.append("")
    for tile in sorted({r["tile_tokens"] for r in rows}):
        group = [r for r in rows if r["tile_tokens"] == tile]
        if len(group) > 1:
            slope, icpt = fit_slope(group)
            lines.append(f"- tiling {tile or 'off'}: {slope / 1024:,.1f} KiB per token (least squares over "
                         f"{len(group)} lengths; intercept {icpt:.3f} GiB)")
    lines.append("- step s / tokens/s above: one step per process, on 2 cores shared with other jobs (load average "
                 "7-9 during these runs): they vary by 2x from run to run and do not compare tiling; see below")
    if speed_result:
        tps = speed_result["tokens_per_second"]
        off, on = tps["0"], tps[str(max(int(k) for k in tps))]
        lines.append(f"- speed (`{speed_result['command']}`: forward + backward of the trainer's model and loss at "
                     f"{speed_result['seq']} tokens, tiling off and on interleaved in one process, median of "
                     f"{speed_result['repeats']} each): {off:.1f} tokens/s untiled, {on:.1f} tiled = "
                     f"{on / off:.2f}x (the tiled parts are computed once more per step)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="2048,4096,8192,16384")
    parser.add_argument("--tiles", default=f"0,{TILE_TOKENS}")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per configuration (2: time the second)")
    parser.add_argument("--write", action="store_true", help="save bench/results/cpu_long_context.{md,json}")
    parser.add_argument("--predict", action="store_true", help="print the estimator's Phi-3-mini-128k predictions")
    parser.add_argument("--speed", type=int, metavar="SEQ",
                        help="tokens/s with tiling off and on at SEQ tokens, interleaved in one process")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the .md from the saved .json with the current estimator (no run)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.speed:
        tile = int(args.tiles.split(",")[-1])
        repeats = 3
        result = speed(args.speed, tile, args.layers, repeats=repeats)
        out = {"command": "python bench/long_context.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "seq": args.speed, "layers": args.layers, "repeats": repeats,
               "tokens_per_second": {str(k): v for k, v in result.items()}}
        print(json.dumps(out))
        if args.write:
            saved = json.loads((RESULTS / "cpu_long_context.json").read_text(encoding="utf-8"))
            saved["speed"] = out
            (RESULTS / "cpu_long_context.json").write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
            render()
        return 0
    if args.render:
        print(render())
        return 0
    if args.predict:
        from qlora_phi3.memory.estimate import format_breakdown

        for name, seq, est in predict_rows():
            print(f"\n{name} at {seq} tokens: {est.total_gib:.2f} GiB\n{format_breakdown(est)}")
        return 0
    seqs = [int(s) for s in args.seqs.split(",")]
    tiles = [int(t) for t in args.tiles.split(",")]
    command = "python bench/long_context.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="qlora-longctx-") as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model", args.layers, max(seqs))
        data = build_long_chats(tmp / "long.jsonl", max(seqs) + 512)
        for seq in seqs:
            for tile in tiles:
                spec = tmp / f"spec-{seq}-{tile}.json"
                spec.write_text(json.dumps({"layers": args.layers, "overrides": _overrides(
                    model_dir, data, tmp / f"run-{seq}-{tile}", seq, tile, steps=args.steps)}))
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True,
                                      text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"seq {seq} tile {tile or 'off'}: peak {row['peak_gib']:.3f} GiB, step "
                      f"{row['step_seconds']:.1f} s [{time.perf_counter() - t0:.0f} s]", flush=True)
                if args.write:  # each row as it is measured: a long run that stops keeps what it had
                    _save(rows, args.layers, command)
    print(_markdown(rows, args.layers, command))
    return 0


def _save(rows: list[dict], layers: int, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)  # (a later --speed --write adds its result to the same file)
    (RESULTS / "cpu_long_context.json").write_text(json.dumps(
        {"command": command, "hardware": _hardware(), "layers": layers, "rows": rows}, indent=1) + "\n",
        encoding="utf-8")
    render()


def render() -> str:
    """Rewrite the markdown table from the measured rows in the JSON, with the estimator as it is now."""
    saved = json.loads((RESULTS / "cpu_long_context.json").read_text(encoding="utf-8"))
    text = _markdown(saved["rows"], saved["layers"], saved["command"], saved["hardware"], saved.get("speed"))
    (RESULTS / "cpu_long_context.md").write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    sys.exit(main())
