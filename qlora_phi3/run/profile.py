"""The profiler: real training steps for every configuration of a grid, peak memory and speed of each.

``qlora-phi3 profile RECIPE --grid lora.r=8,16,64 data.max_seq_len=512,2048`` runs, for each
combination, a few warm-up steps (not counted) and then ``--steps`` measured optimizer steps on
batches of exactly ``micro_batch_size x max_seq_len`` synthetic tokens, through the same code as
``train``: ``model.load_model`` (4-bit base), ``lora.attach_lora`` and the optimizer that
``train.optimizer`` names (built by transformers' own optimizer factory, as the Trainer does).

The step loop is written by hand because TRL's trainer owns its loop: it cannot reset the memory
peaks between configurations nor stop a configuration that runs out of memory and go on.

Between configurations everything of the last one (LoRA, gradients, optimizer states, activations)
is freed and the memory held is checked against the level before the first configuration, so one
configuration's memory never leaks into the next one's figure. The 4-bit base is loaded once and
kept (it is the same for every configuration unless the grid varies ``model.*`` keys).
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_phi3.config import Recipe, load_recipe, recipe_to_dict
from qlora_phi3.errors import UserError
from qlora_phi3.memory.estimate import PHI3_MINI_4K_SIZES

__all__ = ["PHI3_MINI_4K_SIZES", "ProfileRow", "grid_recipes", "parse_grid", "profile", "render_table", "run_profile",
           "write_random_phi3", "write_results"]

LEAK_TOLERANCE_GIB = 1 / 1024  # 1 MiB: small tensors a library caches once (e.g. bitsandbytes' code tables)


@dataclass
class ProfileRow:
    """One configuration's result. Memory in GiB; ``status`` is ok, oom or error."""
    overrides: dict
    lora_r: int
    max_seq_len: int
    micro_batch_size: int
    gradient_checkpointing: str
    optimizer: str
    status: str = "ok"
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    driver_used_gib: float | None = None
    estimated_gib: float | None = None
    estimate_error_pct: float | None = None  # (estimated - measured) / measured, against reserved on CUDA
    fits_budget: bool | None = None
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    baseline_gib: float | None = None  # memory held before this configuration started (leak check)
    message: str = ""


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["lora.r=8,16", "data.max_seq_len=512"]`` -> ``[("lora.r", ["8", "16"]), ("data.max_seq_len", ["512"])]``."""
    axes, seen = [], set()
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid item '{item}' is not key=v1,v2,... (e.g. --grid lora.r=8,16,64 "
                            "data.max_seq_len=512,2048).")
        key, values = item.split("=", 1)
        key = key.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise UserError(f"--grid item '{item}' lists no values; give them comma-separated: {key}=8,16.")
        if key in seen:
            raise UserError(f"--grid names '{key}' twice; list all its values in one item: {key}=a,b,c.")
        seen.add(key)
        axes.append((key, vals))
    return axes


def grid_recipes(recipe_path: str | None, overrides: list[str], grid: list[str]) -> list[tuple[dict, Recipe]]:
    """Every combination of the grid as a validated recipe (recipe < overrides < grid values)."""
    axes = parse_grid(grid)
    out = []
    for combo in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
        point = {key: value for (key, _), value in zip(axes, combo)}
        recipe = load_recipe(recipe_path, overrides + [f"{k}={v}" for k, v in point.items()])
        out.append((point, recipe))
    return out


def write_random_phi3(out_dir: Path, seed: int = 0, **sizes) -> Path:
    """A Phi-3 with random weights and the given sizes, saved like a Hub model (config + safetensors).

    For memory and speed profiling only: the figures depend on shapes, not on trained values. Its
    tokenizer is not needed (the profiler feeds synthetic token ids).
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**{"tie_word_embeddings": False, "sliding_window": None, "pad_token_id": 32000,
                           "bos_token_id": 1, "eos_token_id": 32000, **sizes})
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).to(torch.bfloat16)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _optimizer(params, recipe: Recipe, device: str):
    """The optimizer ``train.optimizer`` names, built by transformers' factory exactly as the Trainer builds it."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, optim=recipe.train.optimizer, learning_rate=recipe.train.lr,
                                 weight_decay=recipe.train.weight_decay, use_cpu=device == "cpu", report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return cls(params, **kwargs)


def _batch(recipe: Recipe, vocab_size: int, device: str, generator):
    """Synthetic token ids of exactly micro_batch_size x max_seq_len; every token carries loss (the worst case)."""
    import torch

    shape = (recipe.train.micro_batch_size, recipe.data.max_seq_len)
    ids = torch.randint(0, vocab_size, shape, generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _one_step(model, optimizer, batch, recipe: Recipe, device: str, dtype: str, scaler) -> None:
    """One optimizer step as our trainer takes it: autocast forward with the same loss (chunked cross-entropy
    unless ``train.loss_chunk_tokens=0``), backward, clip, step, zero grads."""
    import torch

    from qlora_phi3.run.loss import model_loss

    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                        dtype=getattr(torch, dtype), enabled=dtype != "float32"):
        if recipe.train.loss_chunk_tokens:
            loss = model_loss(model, batch, recipe.train.loss_chunk_tokens)
        else:
            loss = model(**batch).loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.train.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # With gradient accumulation the gradients stay allocated through the next micro-batches' forward passes;
    # keeping them (zeroed, not freed) reproduces that peak without running grad_accum micro-batches.
    optimizer.zero_grad(set_to_none=recipe.train.grad_accum == 1)
    del loss


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _detach_lora(peft_model):
    """Back to the bare 4-bit base: LoRA layers removed, checkpointing and input-grad hooks off."""
    base = peft_model.unload()
    base.disable_input_require_grads()
    if getattr(base, "is_gradient_checkpointing", False):
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()
    return base


def _row_for(point: dict, recipe: Recipe) -> ProfileRow:
    return ProfileRow(overrides=point, lora_r=recipe.lora.r, max_seq_len=recipe.data.max_seq_len,
                      micro_batch_size=recipe.train.micro_batch_size,
                      gradient_checkpointing=str(recipe.train.gradient_checkpointing).lower(),
                      optimizer=recipe.train.optimizer)


def _run_configuration(base, recipe: Recipe, row: ProfileRow, meter, device: str, dtype: str, steps: int,
                       warmup: int):
    """Run one configuration on ``base``; fill ``row``; return the bare base again (LoRA removed)."""
    import torch

    from qlora_phi3.model.lora import attach_lora

    model = optimizer = batch = None
    try:
        model = attach_lora(base, recipe.lora, recipe.train.gradient_checkpointing)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, recipe, device)
        scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
        generator = torch.Generator().manual_seed(recipe.train.seed)
        vocab = model.get_base_model().config.vocab_size
        for _ in range(warmup):  # first steps allocate optimizer states and warm kernels: not timed
            batch = _batch(recipe, vocab, device, generator)
            _one_step(model, optimizer, batch, recipe, device, dtype, scaler)
        _sync(device)
        meter.reset()  # peak from here: weights + LoRA + optimizer states as they stand, plus the measured steps
        seconds = []
        for _ in range(steps):
            batch = _batch(recipe, vocab, device, generator)
            _sync(device)
            t0 = time.perf_counter()
            _one_step(model, optimizer, batch, recipe, device, dtype, scaler)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        stats = meter.read()
        row.peak_allocated_gib = round(stats.peak_allocated_gib, 4)
        row.peak_reserved_gib = round(stats.peak_reserved_gib, 4)
        row.driver_used_gib = None if stats.driver_used_gib is None else round(stats.driver_used_gib, 3)
        row.step_seconds = round(sum(seconds) / len(seconds), 4)
        row.tokens_per_second = round(recipe.train.micro_batch_size * recipe.data.max_seq_len / row.step_seconds, 1)
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is recorded and the grid goes on
        row.status = "oom" if _is_oom(e) else "error"
        row.message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    finally:
        del optimizer, batch
        if model is not None:
            for p in model.parameters():
                p.grad = None
            base = _detach_lora(model)
            del model
        _free(device)
    return base


def _estimate_row(row: ProfileRow, recipe: Recipe, model_config, device: str, budget_gib: float | None) -> None:
    from qlora_phi3.memory.estimate import estimate

    est = estimate(recipe, model_config, device)
    # Compare like with like: CPU live tensors vs tensor estimate; CUDA reserved vs reserved estimate.
    row.estimated_gib = round(est.reserved_gib, 4)
    if row.status == "ok" and row.peak_reserved_gib:
        row.estimate_error_pct = round(100 * (est.reserved_gib - row.peak_reserved_gib) / row.peak_reserved_gib, 1)
    if budget_gib is not None:
        if row.status == "oom":
            row.fits_budget = False
        else:  # on a GPU the budget is the card: measured reserved + the CUDA context the estimator adds
            measured_total = None if row.peak_reserved_gib is None else \
                row.peak_reserved_gib + (est.total_gib - est.reserved_gib)
            row.fits_budget = (measured_total if measured_total is not None else est.total_gib) <= budget_gib


def profile(configs: list[tuple[dict, Recipe]], steps: int = 3, warmup: int = 1, budget_gib: float | None = None,
            device: str | None = None) -> tuple[list[ProfileRow], dict]:
    """Run every configuration; returns the rows and the run's metadata (device, versions, leak check)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qlora_phi3.memory.meter import PeakMemory
    from qlora_phi3.model.load import load_model, pick_attention, pick_compute_dtype, pick_device, read_model_config
    from qlora_phi3.run.record import device_info, package_versions
    from qlora_phi3.ui import console, warn

    if steps < 1 or warmup < 1:
        raise UserError(f"--steps {steps} / --warmup {warmup}: both must be at least 1 (the warm-up step "
                        "allocates the optimizer states, which the measured steps must include).")
    first = configs[0][1]
    dev = device or pick_device(first.train.device).value
    dtype = pick_compute_dtype(first.model.compute_dtype, dev).value
    attn = pick_attention(first.model.attn_implementation, dev).value
    meter = PeakMemory(dev)
    rows: list[ProfileRow] = []
    base, base_key, baseline0 = None, None, None
    leaks = []
    progress = Progress(TextColumn("[bold]profile"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=console(), transient=True)
    try:
        with progress:
            task = progress.add_task("", total=len(configs))
            for point, recipe in configs:
                row = _row_for(point, recipe)
                progress.update(task, description=", ".join(f"{k}={v}" for k, v in point.items()))
                model_config = read_model_config(recipe.model)
                key = repr(recipe.model)
                if key != base_key:  # a different base model: drop the old one before loading the next
                    base = None
                    _free(dev)
                    base = load_model(recipe.model, dev, dtype, attn)
                    base_key, baseline0 = key, None
                _free(dev)
                row.baseline_gib = round(meter.current_gib(), 5)
                if baseline0 is None:
                    baseline0 = row.baseline_gib
                elif abs(row.baseline_gib - baseline0) > LEAK_TOLERANCE_GIB:
                    leaks.append(f"{point}: {row.baseline_gib - baseline0:+.4f} GiB held before it started")
                    warn(f"memory before {point} differs from before the first configuration by "
                         f"{row.baseline_gib - baseline0:+.4f} GiB: the previous configuration leaked.")
                base = _run_configuration(base, recipe, row, meter, dev, dtype, steps, warmup)
                _estimate_row(row, recipe, model_config, dev, budget_gib)
                rows.append(row)
                progress.advance(task)
    finally:
        meter.close()
    meta = {"device": device_info(dev), "compute_dtype": dtype, "attn_implementation": attn, "steps": steps,
            "warmup_steps": warmup, "budget_gib": budget_gib, "versions": package_versions(), "leaks": leaks,
            "memory_measure": ("CPU: peak live tensor bytes (qlora_phi3/memory.py)" if dev == "cpu" else
                               "CUDA: max_memory_allocated / max_memory_reserved, reset after warm-up"),
            "recipe": recipe_to_dict(configs[0][1])}
    return rows, meta


def render_table(rows: list[ProfileRow], meta: dict):
    """A rich table: measured beside estimated, error, speed, and whether each fits the budget."""
    from rich.table import Table

    on_gpu = meta["device"].get("kind") == "cuda"
    budget = meta.get("budget_gib")
    title = f"profile on {meta['device'].get('name')} ({'GPU' if on_gpu else 'CPU: live tensor memory'})"
    table = Table(title=title, title_justify="left")
    cols = ["r", "seq", "batch", "ckpt", "status",
            "alloc GiB" if on_gpu else "peak GiB", "reserved GiB" if on_gpu else None, "estimated GiB", "est. error",
            "tokens/s", "step s", f"fits {budget:g} GiB" if budget else None]
    cols = [c for c in cols if c]
    for c in cols:
        table.add_column(c, justify="left" if c in ("ckpt", "status") else "right")
    for r in rows:
        def num(x, fmt="{:.3f}"):
            return "-" if x is None else fmt.format(x)
        cells = [str(r.lora_r), str(r.max_seq_len), str(r.micro_batch_size), r.gradient_checkpointing,
                 {"ok": "ok", "oom": "[red]OOM", "error": "[red]error"}[r.status], num(r.peak_allocated_gib)]
        if on_gpu:
            cells.append(num(r.peak_reserved_gib))
        cells += [num(r.estimated_gib), num(r.estimate_error_pct, "{:+.1f}%"), num(r.tokens_per_second, "{:,.0f}"),
                  num(r.step_seconds, "{:.2f}")]
        if budget:
            cells.append("-" if r.fits_budget is None else "[green]yes" if r.fits_budget else "[red]no")
        table.add_row(*cells)
    return table


def _plot(rows: list[ProfileRow], meta: dict, path: Path) -> None:
    """Peak memory against LoRA rank, one line per sequence length (per batch/checkpointing if they vary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_gpu = meta["device"].get("kind") == "cuda"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[ProfileRow]] = {}
    for r in rows:
        groups.setdefault((r.max_seq_len, r.micro_batch_size, r.gradient_checkpointing), []).append(r)
    vary_other = len({k[1:] for k in groups}) > 1
    colors = {}
    for (seq, mbs, ckpt), group in sorted(groups.items()):
        color = colors.setdefault(seq, f"C{len(colors)}")
        label = f"seq {seq}" + (f", batch {mbs}, ckpt {ckpt}" if vary_other else "")
        ok = sorted((r for r in group if r.status == "ok"), key=lambda r: r.lora_r)
        style = "-" if ckpt == "true" else "--"
        if ok:
            ax.plot([r.lora_r for r in ok], [r.peak_reserved_gib for r in ok], style, marker="o", color=color,
                    label=label)
            ax.plot([r.lora_r for r in ok], [r.estimated_gib for r in ok], ":", color=color, alpha=0.6)
        for r in group:
            if r.status != "ok":
                ax.plot([r.lora_r], [r.estimated_gib], "x", color=color, markersize=10)
    if meta.get("budget_gib"):
        ax.axhline(meta["budget_gib"], color="red", linewidth=1.5, label=f"budget {meta['budget_gib']:g} GiB")
    ax.set_xscale("log", base=2)
    ranks = sorted({r.lora_r for r in rows})
    ax.set_xticks(ranks, labels=[str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("peak reserved memory, GiB" if on_gpu else "peak live tensor memory, GiB")
    ax.set_title(f"{meta['device'].get('name')}: measured (solid/dashed), estimated (dotted), OOM (x)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[ProfileRow], meta: dict, out_dir: Path) -> dict[str, Path]:
    """profile.csv, profile.json and profile.png in ``out_dir``, each written to a temp file and renamed."""
    import os

    from qlora_phi3.run.record import atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "profile.csv", "json": out_dir / "profile.json", "png": out_dir / "profile.png"}
    names = [f for f in asdict(rows[0]) if f != "overrides"] if rows else []
    tmp = paths["csv"].with_name(".profile.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["overrides", *names])
        for r in rows:
            d = asdict(r)
            writer.writerow([" ".join(f"{k}={v}" for k, v in r.overrides.items()), *[d[n] for n in names]])
    os.replace(tmp, paths["csv"])
    atomic_write_json(paths["json"], {**meta, "rows": [asdict(r) for r in rows]})
    tmp_png = paths["png"].with_name(".profile.tmp.png")
    _plot(rows, meta, tmp_png)
    os.replace(tmp_png, paths["png"])
    return paths


def run_profile(recipe_path: str | None, overrides: list[str], grid: list[str], steps: int, warmup: int,
                budget: str | None, out_dir: str | None) -> tuple[list[ProfileRow], dict, dict]:
    """The ``qlora-phi3 profile`` command: validate everything, run the grid, show and write the results."""
    from qlora_phi3.memory.estimate import parse_budget
    from qlora_phi3.ui import console, info

    budget_gib = parse_budget(budget) if budget else None
    configs = grid_recipes(recipe_path, overrides, grid)
    stem = Path(recipe_path).stem if recipe_path else "tiny_cpu"
    out = Path(out_dir) if out_dir else Path("profiles") / stem
    info(f"profiling {len(configs)} configuration(s), {warmup} warm-up + {steps} measured step(s) each")
    rows, meta = profile(configs, steps, warmup, budget_gib)
    console().print(render_table(rows, meta))
    paths = write_results(rows, meta, out)
    if meta["leaks"]:
        from qlora_phi3.ui import warn

        warn("memory leaked between configurations: " + "; ".join(meta["leaks"]))
    info(f"results: {paths['csv']}, {paths['json']}, {paths['png']}")
    return rows, meta, paths
