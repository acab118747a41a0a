"""qlora-phi3's recipe versus the cookbook QLoRA pipeline over a ladder of mini Phi-3 shapes, CPU.

    python bench/compare.py --write                    # the ladder; writes bench/results/cpu_compare_ladder.md
    python bench/compare.py --shapes 4x768             # one shape (LAYERSxHIDDEN, hidden a multiple of 96)
    python bench/compare.py --shapes 2x384 --conversations 106

Why a ladder: on a mini Phi-3 the 32,064-row vocabulary head is most of a step, and the chunked label-only loss
removes most of the head, so a mini's ratio measures the head, not what a Phi-3-mini user gets (32 layers of width
3072, where the head is ~3% of the matmul FLOPs). The ladder climbs the body-to-head ratio toward Phi-3-mini's,
and one layer at the real width 3072 gives the per-layer and head costs at the real width, from which the real
shape's ratio is derived (body x 32 layers + head; the derivation is printed and written with the results).

Ours is ``qlora-phi3 train phi3_mini_4k_12gb`` as shipped: nothing tuned for the benchmark, only the model,
the data file, the run directory, the CPU, one epoch and no sample answers are set (the recipe's packing,
micro-batch, accumulation, learning rate, chunked loss, checkpointing, optimizer and compute dtype ``auto`` are
its own). The reference is the cookbook's notebook pipeline (bench/reference_pipeline.py): micro-batches of
``--micro-batch-ref`` (8) padded to their longest sample, with the same LoRA, learning rate, optimizer,
assistant-only labels and train/eval split, in the dtype this machine runs natively (``--reference-dtype auto``:
bf16 where the CPU has it natively, fp32 elsewhere: emulated bf16 is ~10x slower and would flatter ours).

Each model is a "mini Phi-3": the real architecture, vocabulary (32064) and head dim (96), MLP width 8/3 of the
hidden width (Phi-3-mini's 8192/3072), random weights (no download); the tokenizer is the shipped Phi-3 one.
The data is a chat set of mixed lengths (30 to ~1,900 tokens, median ~250) built from the bundled synthetic
tasks; bigger shapes get shorter conversations (``--pair-scale``, default per shape in SETTINGS) so that
the ladder fits in ~30 minutes on 2 shared cores. Each pipeline runs in its own process, one after the other, with the
same thread count (``--threads``). Both are timed from inside the Trainer: from the first optimizer step's start
to the last one's end (no evaluation inside), and within it the head: from the final norm's output to its
gradient (lm_head, the loss and their backward; the reference's includes TRL's logged token accuracy). Tokens/s
counts real (non-padding) tokens. The load average (``uptime``) is recorded before and after each shape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["build_chat_set", "build_mini_phi3", "derive_real_ratio", "flops_per_token", "full_set_padding", "main",
           "parse_shape", "run_worker"]

VOCAB = 32064
HEAD_DIM = 96
PHI3_MINI = (32, 3072)  # layers, hidden of microsoft/Phi-3-mini-4k-instruct (MLP 8192)
LADDER = ("2x384", "4x768", "1x3072")
# Per shape: (conversations, pair scale). Bigger shapes get shorter conversations (the number of question/answer
# pairs divided by the scale, the same mix of short, medium and long) so that the ladder fits in ~30 minutes of a
# shared 2-core CPU: a 1x3072 token costs ~30x a 2x384 one. Per-token costs at a width do not depend on it beyond
# attention's share; the padding it changes is carried to the full-length set in the derivation (FULL_SET).
SETTINGS = {"2x384": (12, 1), "4x768": (12, 4), "8x1536": (9, 8), "1x3072": (9, 8)}
DEFAULT_SETTING = (9, 8)
RESULTS = REPO / "bench" / "results" / "cpu_compare_ladder.md"
FULL_SET = 106  # conversations of the full-length set whose padding the derivation uses (96 train + 10 eval)


def parse_shape(text: str) -> tuple[int, int]:
    """'LAYERSxHIDDEN' -> (layers, hidden); hidden must be a multiple of Phi-3's head dim (96)."""
    try:
        layers, hidden = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: write LAYERSxHIDDEN, e.g. 4x768") from None
    if layers < 1 or hidden < HEAD_DIM or hidden % HEAD_DIM:
        raise argparse.ArgumentTypeError(f"shape {text!r}: at least 1 layer, hidden a multiple of {HEAD_DIM}")
    return layers, hidden


def intermediate_for(hidden: int) -> int:
    return hidden * 8192 // 3072  # Phi-3-mini's MLP ratio


def flops_per_token(layers: int, hidden: int) -> tuple[int, int]:
    """Forward matmul FLOPs per token of the decoder layers (qkv + o + gate_up + down) and of the vocabulary head;
    attention scores (which grow with the sequence) and norms are left out."""
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate_for(hidden))
    return layers * per_layer, 2 * hidden * VOCAB


def build_mini_phi3(out_dir: Path, layers: int, hidden: int, intermediate: int, seed: int = 0) -> Path:
    """Phi-3 architecture, vocab 32064, head dim 96, random bf16 weights, the shipped Phi-3 tokenizer."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from qlora_phi3.model.tiny import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Phi3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM,
                        num_key_value_heads=hidden // HEAD_DIM, max_position_embeddings=4096,
                        original_max_position_embeddings=4096, bos_token_id=1, eos_token_id=eos, pad_token_id=eos,
                        tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_chat_set(path: Path, n: int, seed: int = 0, pair_scale: int = 1) -> Path:
    """Conversations of 1-3 question/answer pairs (25%), 6-20 (55%) and 30-90 (20%): about 30 to 1,900 tokens,
    median ~250, the shape of scraped multi-turn chat; ``pair_scale`` divides the pair counts (at least one)."""
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
            messages = [msg for pair in rng.sample(pairs, max(1, k // pair_scale)) for msg in pair]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


RECIPE = "phi3_mini_4k_12gb"


def _recipe(spec: dict, output_dir: str | None = None):
    """The shipped recipe with only what this machine and data need changed."""
    from qlora_phi3.config import load_recipe, resolve_recipe

    return load_recipe(resolve_recipe(RECIPE), [
        f"model.name_or_path={spec['model_dir']}", "model.revision=null", f"data.path={spec['data_path']}",
        "data.split=train", "data.eval_split=null", "data.eval_fraction=0.1", "data.max_eval_samples=2",
        f"train.output_dir={output_dir or spec['workdir'] + '/ours'}", "train.max_steps=-1", "train.epochs=1",
        "train.eval_steps=0", "train.save_steps=0", "train.logging_steps=1", "train.sample_prompts=0",
        f"train.device={spec.get('device', 'cpu')}", *spec.get("ours_overrides", [])])


def _splits(spec: dict):
    from qlora_phi3.data.encode import encode_records
    from qlora_phi3.data.split import load_splits
    from qlora_phi3.model.load import load_tokenizer

    recipe = _recipe(spec)
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(recipe.data, recipe.train.seed)
    return (encode_records(splits.train, tokenizer, recipe.data.max_seq_len),
            encode_records(splits.eval, tokenizer, recipe.data.max_seq_len), recipe)


class StepClock:
    """Times a Trainer from inside: its optimizer steps (first step's start to last step's end, so no step-0
    evaluation), and within them the head, from the final norm's output in forward to its gradient in backward."""

    def __init__(self):
        self.first_begin = self.last_end = None
        self.head_seconds = 0.0

    def attach(self, trainer) -> None:
        import torch
        from transformers import TrainerCallback

        norm = [m for name, m in trainer.model.named_modules() if name.endswith("model.norm")][-1]

        def on_norm(module, args, out):
            if module.training and torch.is_grad_enabled() and out.requires_grad:
                t0 = time.perf_counter()

                def on_grad(grad):
                    self.head_seconds += time.perf_counter() - t0

                out.register_hook(on_grad)

        norm.register_forward_hook(on_norm)
        clock = self

        class Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.first_begin = clock.first_begin or time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.last_end = time.perf_counter()

        trainer.add_callback(Steps())

    @contextlib.contextmanager
    def installed(self):
        """Attach to every Trainer trained inside the block (both pipelines build theirs inside library code)."""
        import transformers

        train = transformers.Trainer.train

        def clocked(trainer, *args, **kwargs):
            self.attach(trainer)
            return train(trainer, *args, **kwargs)

        transformers.Trainer.train = clocked
        try:
            yield self
        finally:
            transformers.Trainer.train = train

    def fields(self, real_tokens: int) -> dict:
        steps_s = self.last_end - self.first_begin
        return {"steps_seconds": steps_s, "head_seconds": self.head_seconds,
                "head_share": self.head_seconds / steps_s, "tokens_per_second": real_tokens / steps_s}


def _worker(which: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    with StepClock().installed() as clock:
        out = _train_pipeline(which, spec)
    out.update(clock.fields(out["tokens"]))
    (spec_path.parent / f"{which}.json").write_text(json.dumps(out, indent=1))


def _train_pipeline(which: str, spec: dict) -> dict:
    if which == "ours":
        from qlora_phi3.run.train import train
        from qlora_phi3.ui import quiet_library_noise

        quiet_library_noise()
        result = train(_recipe(spec), force=True, cpu_memory="rss").run
        out = {"peak_gib": result["peak_memory"]["peak_allocated_gib"], "train_seconds": result["train_seconds"],
               "tokens": result["tokens"]["real_tokens"], "padded_tokens": result["tokens"]["padded_tokens"],
               "train_losses": [h["loss"] for h in result["history"] if "loss" in h],
               "eval_loss_end": result["eval_loss_end"], "steps": result["steps"],
               "compute_dtype": result["compute_dtype"], "threads": (result.get("cpu_threads") or {}).get("threads")}
    else:
        import torch

        from bench.reference_pipeline import run_reference

        train_enc, eval_enc, recipe = _splits(spec)
        out = run_reference(spec["model_dir"], train_enc, eval_enc, micro_batch_size=spec["micro_batch_ref"],
                            grad_accum=1, epochs=1, lr=recipe.train.lr, lora=recipe.lora,
                            optimizer=recipe.train.optimizer, seed=recipe.train.seed,
                            output_dir=spec["workdir"] + "/reference", compute_dtype=spec["reference_dtype"],
                            evaluate=False, device=spec.get("device", "cpu"))
        out.update(compute_dtype=spec["reference_dtype"], threads=torch.get_num_threads())
    return out


def run_worker(which: str, spec_path: Path, threads: int | None = None, console=None,
               in_process: bool = False) -> dict:
    """One pipeline ("ours" or "reference") in its own process on ``spec_path``'s model and data; its results.
    The spec may also name ``device`` (default cpu) and ``ours_overrides`` (recipe overrides for ours).
    ``in_process`` runs it here instead: for a check of the code path (gpu_check's dry run), where a fresh
    interpreter's imports would cost more than the pass and the timings are not the point."""
    if in_process:
        _worker(which, spec_path)
        return json.loads((spec_path.parent / f"{which}.json").read_text())
    log = spec_path.parent / f"{which}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    status = console.status(f"training {which} (log: {log})") if console else contextlib.nullcontext()
    with status, open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", which, "--spec", str(spec_path)],
                              stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return json.loads((spec_path.parent / f"{which}.json").read_text())


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_shape(shape: str, conversations: int, pair_scale: int, args, workdir: Path, console) -> dict:
    """Both pipelines on one mini shape, back to back; the row of the ladder."""
    layers, hidden = parse_shape(shape)
    shape_dir = workdir / shape
    shape_dir.mkdir(parents=True, exist_ok=True)
    model_dir = shape_dir / "mini-phi3"
    load_before = _load()
    with console.status(f"{shape}: building the mini Phi-3 and {conversations} conversations (pairs / {pair_scale})"):
        if not (model_dir / "config.json").is_file():
            build_mini_phi3(model_dir, layers, hidden, intermediate_for(hidden))
        data_path = build_chat_set(shape_dir / "chats.jsonl", conversations, pair_scale=pair_scale)
    spec = {"model_dir": str(model_dir), "data_path": str(data_path), "workdir": str(shape_dir),
            "micro_batch_ref": args.micro_batch_ref, "reference_dtype": args.reference_dtype}
    train_enc, _, recipe = _splits(spec)
    lengths = sorted(len(x) for x in train_enc.input_ids)
    spec_path = shape_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    ref = run_worker("reference", spec_path, args.threads, console)
    load_between = _load()
    ours = run_worker("ours", spec_path, args.threads, console)
    body, head = flops_per_token(layers, hidden)
    row = {"shape": shape, "layers": layers, "hidden": hidden, "intermediate": intermediate_for(hidden),
           "body_to_head_flops": body / head, "conversations": conversations, "pair_scale": pair_scale,
           "n_train": len(lengths),
           "min_len": lengths[0], "max_len": lengths[-1], "median_len": lengths[len(lengths) // 2],
           "reference": ref, "ours": ours, "ratio": ours["tokens_per_second"] / ref["tokens_per_second"],
           "load": [load_before, load_between, _load()],
           "recipe": {"packing": recipe.data.packing, "micro_batch_size": recipe.train.micro_batch_size,
                      "grad_accum": recipe.train.grad_accum, "max_seq_len": recipe.data.max_seq_len,
                      "loss_chunk_tokens": recipe.train.loss_chunk_tokens}}
    console.print(f"{shape}: reference {ref['tokens_per_second']:.1f} tokens/s, ours {ours['tokens_per_second']:.1f}"
                  f" -> {row['ratio']:.2f}x (head share {ref['head_share']:.0%} / {ours['head_share']:.0%}; "
                  f"load {' -> '.join(row['load'])})")
    return row


def _padding_share(p: dict) -> float:
    return p["padded_tokens"] / (p["padded_tokens"] + p["tokens"])


def derive_real_ratio(row: dict, padding: tuple[float, float] | None = None,
                      target: tuple[int, int] = PHI3_MINI) -> float:
    """The ratio one shape's measurements predict at ``target`` (default Phi-3-mini's 32 x 3072).

    Each pipeline's seconds per computed token (real + padding) are split into body (the steps minus the head)
    and head; the body is scaled by the body's matmul FLOPs per token, the head by the head's. At the real width
    (1x3072) that is exact up to per-step overheads (32 layers cost 32 times one, the head is the same); from a
    narrower shape it also assumes the same seconds per FLOP and leaves attention's share out. ``padding``
    (reference, ours) replaces each side's measured padding share, e.g. by a full-length set's."""
    body, head = flops_per_token(row["layers"], row["hidden"])
    body_t, head_t = flops_per_token(*target)

    def seconds_per_real_token(p: dict, share: float) -> float:
        computed = p["tokens"] + p["padded_tokens"]
        per_computed = ((p["steps_seconds"] - p["head_seconds"]) * body_t / body
                        + p["head_seconds"] * head_t / head) / computed
        return per_computed / (1.0 - share)

    ref, ours = row["reference"], row["ours"]
    shares = padding or (_padding_share(ref), _padding_share(ours))
    return seconds_per_real_token(ref, shares[0]) / seconds_per_real_token(ours, shares[1])


def full_set_padding(workdir: Path, micro_batch_ref: int) -> dict:
    """Padding shares of both pipelines on the full-length chat set (FULL_SET conversations, no training): the
    reference's micro-batches of ``micro_batch_ref`` in a seeded random order, ours' packed rows in micro-batches
    of the recipe's size, each padded to its longest."""
    from qlora_phi3.data.packing import pack_rows, padded_tokens

    path = build_chat_set(workdir / "full-set.jsonl", FULL_SET)
    train_enc, _, recipe = _splits({"model_dir": str(REPO / "qlora_phi3" / "assets" / "tiny-phi3"),
                                    "data_path": str(path), "workdir": str(workdir)})
    lengths = [len(x) for x in train_enc.input_ids]
    real = sum(lengths)
    ref_pad = padded_tokens(lengths, micro_batch_ref, recipe.train.seed)
    rows = sorted(sum(lengths[i] for i in row) for row in pack_rows(lengths, recipe.data.max_seq_len))
    mb = recipe.train.micro_batch_size
    ours_pad = sum(max(rows[i:i + mb]) * len(rows[i:i + mb]) - sum(rows[i:i + mb]) for i in range(0, len(rows), mb))
    return {"conversations": len(lengths), "real_tokens": real, "reference": ref_pad / (ref_pad + real),
            "ours": ours_pad / (ours_pad + real)}


def ladder_table(rows: list[dict], full: dict) -> str:
    lines = ["| shape (layers x hidden) | body:head matmul FLOPs | train conversations: pairs / scale (tokens, "
             "median) | reference tokens/s | ours tokens/s | **ours / reference** | padding ref / ours | head "
             "share of the step ref / ours | derived at 32x3072: this data / full-set padding | load 1/5/15 min: "
             "before / between / after |",
             "|---|---:|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        ref, ours = r["reference"], r["ours"]
        lines.append(
            f"| {r['shape']} (MLP {r['intermediate']}) | {r['body_to_head_flops']:.2f} | {r['n_train']}: /"
            f"{r['pair_scale']} ({r['min_len']}-{r['max_len']}, {r['median_len']}) | {ref['tokens_per_second']:.1f} "
            f"| {ours['tokens_per_second']:.1f} | **{r['ratio']:.2f}x** | {_padding_share(ref):.0%} / "
            f"{_padding_share(ours):.0%} | {ref['head_share']:.0%} / {ours['head_share']:.0%} | "
            f"{derive_real_ratio(r):.2f}x / {derive_real_ratio(r, (full['reference'], full['ours'])):.2f}x | "
            f"{' / '.join(r['load'])} |")
    body, head = flops_per_token(*PHI3_MINI)
    lines.append(f"| 32x3072 (Phi-3-mini, MLP 8192) | {body / head:.2f} | not trained on a CPU | | | | | | | |")
    lines += ["", f"Full-length set ({full['conversations']} train conversations of the default mix, "
              f"{full['real_tokens']:,} real tokens; no training): padding {full['reference']:.0%} of the "
              f"reference's computed tokens, {full['ours']:.0%} of ours'."]
    return "\n".join(lines)


def _machine() -> dict:
    from qlora_phi3.machine import cpu_bf16
    from qlora_phi3.run.record import device_info, package_versions

    cpu = device_info("cpu")
    native, why = cpu_bf16()
    return {"cpu": cpu, "native_bf16": native, "bf16_why": why, "versions": package_versions()}


def _header(machine: dict, args, command: str) -> str:
    cpu, v = machine["cpu"], machine["versions"]
    return "\n".join([
        f"Hardware: {cpu['name']}, {cpu['cores']} cores, {cpu['ram_gib']} GiB RAM, bf16 flags: "
        f"{', '.join(cpu.get('bf16_flags') or []) or 'none'} (native bf16: {machine['native_bf16']}), no GPU. "
        f"Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x) + ".",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')}); both pipelines with {args.threads} torch "
        f"thread(s); reference compute dtype {args.reference_dtype}, ours `compute_dtype: auto`.",
        "", f"Ours: `{RECIPE}` as shipped (packed rows of 2048, micro-batch 2 x grad_accum 4, chunked label-only loss "
        f"of 256); reference: the cookbook pipeline, micro-batch {args.micro_batch_ref} padded to its longest, "
        "same LoRA, lr, optimizer and split. Tokens/s: real tokens over the optimizer steps' time (no eval); head "
        "share: time from the final norm's output to its gradient over the steps' time. Derived at 32x3072: "
        "each row's body seconds per computed token scaled by body FLOPs, head seconds by head FLOPs, with that "
        "row's padding or the full-length set's (`derive_real_ratio`; exact in the layer count at width 3072)."])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(LADDER),
                   help=f"comma-separated LAYERSxHIDDEN (default the ladder: {','.join(LADDER)})")
    p.add_argument("--conversations", type=int, default=None,
                   help=f"conversations per shape, 10%% held out (default per shape: SETTINGS {SETTINGS}, else "
                        f"{DEFAULT_SETTING})")
    p.add_argument("--pair-scale", type=int, default=None,
                   help="divide each conversation's question/answer pairs by this (default per shape: SETTINGS)")
    p.add_argument("--micro-batch-ref", type=int, default=8, help="reference micro-batch (padded to its longest)")
    p.add_argument("--reference-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: what this CPU runs natively (bf16 with AVX512-BF16/AMX, else fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: qlora-phi3's pick)")
    p.add_argument("--workdir", type=Path, default=None, help="keep models, data and logs here (default: temp dir)")
    p.add_argument("--write", action="store_true", help="write bench/results/cpu_compare_ladder.{md,json}")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.spec)
        return 0
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    for s in shapes:
        try:
            parse_shape(s)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
    from rich.console import Console

    from qlora_phi3.machine import pick_threads
    from qlora_phi3.model.load import pick_compute_dtype

    console = Console()
    if a.reference_dtype == "auto":
        a.reference_dtype = pick_compute_dtype("auto", "cpu").value
    a.threads = a.threads or pick_threads()[0]
    machine = _machine()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="qlora-phi3-compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    full = full_set_padding(workdir, a.micro_batch_ref)
    command = ("python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    rows = []
    for s in shapes:
        n, scale = SETTINGS.get(s, DEFAULT_SETTING)
        rows.append(run_shape(s, a.conversations or n, a.pair_scale or scale, a, workdir, console))
        rows[-1].update(command=command, threads=a.threads, reference_dtype=a.reference_dtype,
                        measured=time.strftime("%Y-%m-%d %H:%M"))
        if a.write:  # after each shape, so a run cut short keeps what it measured
            _write(rows[-1], machine, full, a, console)
    console.print(_header(machine, a, command) + "\n\n" + ladder_table(rows, full))
    return 0


def _write(row: dict, machine: dict, full: dict, args, console) -> None:
    """Merge ``row`` into bench/results/cpu_compare_ladder.{json,md}: a shape's row replaces its earlier one, the
    other shapes' rows stay (each with its own command, date and load)."""
    data_path = RESULTS.with_suffix(".json")
    old = json.loads(data_path.read_text()) if data_path.is_file() else {}
    if old.get("machine", {}).get("cpu") != machine["cpu"]:
        old = {}  # another machine's ladder is not this one's
    rows = sorted([r for r in old.get("rows", []) if r["shape"] != row["shape"]] + [row],
                  key=lambda r: (r["body_to_head_flops"], r["hidden"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text(json.dumps({"machine": machine, "full_set": full, "rows": rows}, indent=1) + "\n")
    commands = [f"- {r['shape']}: `{r['command']}` ({r['measured']}, {r['threads']} thread(s), reference in "
                f"{r['reference_dtype']})" for r in rows]
    RESULTS.write_text("# qlora-phi3's recipe vs the cookbook QLoRA pipeline over a ladder of shapes, CPU\n\n"
                       + _header(machine, args, row["command"]) + "\n\n" + ladder_table(rows, full)
                       + "\n\nEach row's command:\n\n" + "\n".join(commands) + "\n")
    console.print(f"written: {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
