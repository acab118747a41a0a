"""The profiler: a few real training steps per configuration of a grid, peak memory and speed of each.

``qlora-phi3 profile RECIPE --grid lora.r=8,16,64 data.max_seq_len=512,2048`` runs, for each
combination, ``qlora-phi3 train``'s own code (:func:`qlora_phi3.run.train.measure`: its setup and fit with a
measuring callback:
the same trainer, collator, packing, loss, autocast, checkpointing and optimizer) for a few warm-up
steps (not counted) and ``--steps`` measured optimizer steps, on conversations that each fill
``data.max_seq_len`` (so every micro-batch is ``micro_batch_size x max_seq_len`` tokens: the worst case
of the recipe), and puts the measured peak beside the estimator's.

Each configuration runs in a fresh process. On a GPU that is what makes the figures honest: a process
that ran an earlier configuration still holds cuBLAS workspaces, the caching allocator's blocks and
bitsandbytes' paged optimizer buffers (its page manager keeps them after the optimizer is gone), so
a second configuration in the same process would be measured on top of the first one's leftovers. On
the CPU (live-tensor measure) the fresh process changes nothing: tests/unit/run/test_profile.py checks that the
profiled peak equals the peak ``train`` records for the same configuration. The price is loading the
model once per configuration (seconds for Phi-3-mini from a local disk). On the CPU each configuration's process
is forked from a server process that has already imported torch, transformers, PEFT, TRL and bitsandbytes (about
5 s per configuration on a 2-core Xeon with avx512_bf16, half of a tiny configuration's time); on a GPU it is a new interpreter, because
a process forked after CUDA was asked about cannot use it.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_phi3.config import Recipe, dump_recipe, load_recipe, recipe_to_dict, with_absolute_paths
from qlora_phi3.data.prompts import prompt_limit
from qlora_phi3.data.synthetic import (write_full_length_conversations, write_full_length_pairs,
                                       write_full_length_prompts)
from qlora_phi3.errors import RunFailed, UserError
from qlora_phi3.files import atomic_write_json, atomic_write_text
from qlora_phi3.memory.estimate import config_for_estimate, estimate
from qlora_phi3.methods import METHODS
from qlora_phi3.model.load import load_tokenizer, pick_attention, pick_compute_dtype, pick_device
from qlora_phi3.run.record import device_info, package_versions

__all__ = ["ProfileRow", "check_quality_applies", "grid_recipes", "parse_grid", "pick", "profile", "write_results"]


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
    peak_allocated_gib: float | None = None  # CUDA max_memory_allocated; CPU peak live tensors
    peak_reserved_gib: float | None = None  # CUDA max_memory_reserved; CPU same as allocated
    driver_used_gib: float | None = None  # CUDA: device memory in use (incl. context, paged optimizer states)
    estimated_gib: float | None = None
    estimate_error_pct: float | None = None  # (estimated - measured) / measured, against reserved on CUDA
    fits_budget: bool | None = None
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    baseline_gib: float | None = None  # held when measuring began: weights, LoRA, optimizer states
    eval_loss_start: float | None = None  # --quality-steps: held-out loss of the recipe's data before training
    eval_loss: float | None = None  # ... and after the quality steps: lower is better, compare within one profile
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


def grid_recipes(recipe_path: str | Path | None, overrides: list[str], grid: list[str]) -> list[tuple[dict, Recipe]]:
    """Every combination of the grid as a validated recipe (recipe < overrides < grid values)."""
    axes = parse_grid(grid)
    out = []
    for combo in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
        point = {key: value for (key, _), value in zip(axes, combo)}
        recipe = load_recipe(recipe_path, overrides + [f"{k}={v}" for k, v in point.items()])
        out.append((point, recipe))
    return out


def _row_for(point: dict, recipe: Recipe) -> ProfileRow:
    return ProfileRow(overrides=point, lora_r=recipe.lora.r, max_seq_len=recipe.data.max_seq_len,
                      micro_batch_size=recipe.train.micro_batch_size,
                      gradient_checkpointing=str(recipe.train.gradient_checkpointing).lower(),
                      optimizer=recipe.train.optimizer)


def _conversations_needed(recipe: Recipe, steps: int, warmup: int) -> int:
    """Records the run reads: micro-batches x steps, plus the held-out one and a spare. grpo's batch sizes count
    completions, num_generations per prompt record."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = recipe.train.micro_batch_size * recipe.train.grad_accum * (steps + warmup) * world
    if METHODS[recipe.train.method].generates:
        rows = -(-rows // recipe.train.num_generations)
    return rows + 2


def _data_key(recipe: Recipe) -> tuple:
    """What the profile's data depends on: configurations that share it share one file."""
    kind = METHODS[recipe.train.method].data
    if kind == "prompts":  # the prompt fills what the completion leaves of the row
        return recipe.model.name_or_path, kind, prompt_limit(recipe.data, recipe.train.max_completion_len)
    return recipe.model.name_or_path, kind, recipe.data.max_seq_len


def _write_data(path: Path, recipe: Recipe, n: int) -> Path:
    """``n`` records of the recipe's data kind at the configuration's full length (its worst case)."""
    kind = METHODS[recipe.train.method].data
    tokenizer = load_tokenizer(recipe.model)
    if kind == "chat":
        return write_full_length_conversations(path, tokenizer, n, recipe.data.max_seq_len)
    if kind == "prompts":  # grpo: prompts at the limit; the completions fill the rest of the row (training_arguments)
        limit = prompt_limit(recipe.data, recipe.train.max_completion_len)
        try:
            return write_full_length_prompts(path, tokenizer, n, limit)
        except ValueError as e:
            raise UserError(f"profile: {e}; raise data.max_seq_len or data.max_prompt_len, or lower "
                            "train.max_completion_len.") from None
    # preference rows: chosen and rejected (or KTO answers) that each fill max_seq_len
    return write_full_length_pairs(path, tokenizer, n, recipe.data.max_seq_len, unpaired=kind == "unpaired")


def _measure_recipe(recipe: Recipe, data_path: Path, run_dir: Path) -> Recipe:
    """The configuration as the worker trains it: full-length data, a scratch run directory. grpo's rewards become
    the built-in numeric_answer on the synthetic prompts' ``answer`` column: the recipe's own may need columns those
    lack, and a reward is Python between generation and the step, with no tensors of its own."""
    r = copy.deepcopy(recipe)
    r.data.path, r.data.eval_split, r.data.max_samples = str(data_path), None, None
    r.data.max_eval_samples, r.data.eval_fraction = 1, 0.01
    r.train.output_dir = str(run_dir)
    if METHODS[r.train.method].data == "prompts":
        r.train.rewards, r.train.reward_weights, r.train.answer_column = ["numeric_answer"], None, "answer"
    return r


def _quality_recipe(recipe: Recipe, steps: int, run_dir: Path) -> Recipe:
    """The configuration as the quality run trains it: the recipe's own data and eval split, ``steps`` optimizer
    steps (the schedule fitted to them), evaluated at the start and the end only; no checkpoints, samples or
    trackers."""
    r = with_absolute_paths(recipe)
    r.train.max_steps, r.train.eval_steps, r.train.save_steps = steps, 0, 0
    r.train.sample_prompts, r.train.report_to = 0, []
    r.train.output_dir = str(run_dir)
    return r


# What the CPU workers' server process imports once (run.train pulls in torch, transformers, PEFT, TRL, bitsandbytes).
_FORKSERVER_PRELOAD = ["qlora_phi3.run.train"]


def _run_worker(recipe: Recipe, steps: int, warmup: int, workdir: Path, device: str,
                quality: Recipe | None = None) -> dict:
    """Run one configuration in a fresh process; its result dict. On a GPU a new ``python -m
    qlora_phi3.run.profile`` interpreter; on the CPU a process forked from the preloaded server (module docstring).
    ``quality``: the quality run (:func:`_quality_recipe`), trained in the same process after the measured steps."""
    recipe_path, result_path, log_path = workdir / "recipe.yaml", workdir / "result.json", workdir / "worker.log"
    dump_recipe(recipe, recipe_path)
    quality_path = ""
    if quality is not None:
        quality_path = str(workdir / "quality.yaml")
        dump_recipe(quality, Path(quality_path))
    args = (str(recipe_path), str(result_path), warmup, steps, quality_path)
    if device == "cpu":
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # takes effect when the server starts (the first call)
        proc = ctx.Process(target=_forked_worker, args=(*args, str(log_path)), name="qlora-phi3-profile")
        proc.start()
        proc.join()
        code, output = proc.exitcode, log_path.read_text(errors="replace") if log_path.is_file() else ""
    else:
        done = subprocess.run([sys.executable, "-m", "qlora_phi3.run.profile", *map(str, args)], capture_output=True,
                              text=True)
        code, output = done.returncode, done.stderr or done.stdout
    if result_path.is_file():
        return json.loads(result_path.read_text())
    tail = output.strip().splitlines()[-1:] or [f"exit status {code}"]
    return {"status": "error", "message": f"the worker process died: {tail[0][:300]}"}


def profile(configs: list[tuple[dict, Recipe]], steps: int = 2, warmup: int = 1, budget_gib: float | None = None,
            recipe_name: str = "recipe", quality_steps: int = 0) -> tuple[list[ProfileRow], dict]:
    """Run every configuration (each in its own process); returns the rows and the run's metadata.
    ``quality_steps``: also train each configuration that many steps on the recipe's own data and record its
    held-out eval loss before and after (0: memory and speed only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qlora_phi3.ui import console

    if steps < 1 or warmup < 1:
        raise UserError(f"--steps {steps} / --warmup {warmup}: both must be at least 1 (the warm-up step "
                        "allocates the optimizer states, which the measured steps must include).")
    if quality_steps < 0:
        raise UserError(f"--quality-steps {quality_steps}: give a number of optimizer steps (0 = no quality run).")
    check_quality_applies(configs, quality_steps)
    first = configs[0][1]
    dev = pick_device(first.train.device).value
    rows: list[ProfileRow] = []
    data_files: dict[tuple, tuple[Path, int]] = {}  # (model, max_seq_len) -> (file, conversations in it)
    progress = Progress(TextColumn("[bold]profile"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=console(), transient=True)
    with tempfile.TemporaryDirectory(prefix="qlora-phi3-profile-") as tmp, progress:
        task = progress.add_task("", total=len(configs))
        for i, (point, recipe) in enumerate(configs):
            progress.update(task, description=", ".join(f"{k}={v}" for k, v in point.items()))
            row = _row_for(point, recipe)
            n = _conversations_needed(recipe, steps, warmup)
            key = _data_key(recipe)
            if key not in data_files or data_files[key][1] < n:
                data_files[key] = (_write_data(Path(tmp) / f"data-{i}.jsonl", recipe, n), n)
            workdir = Path(tmp) / f"config-{i}"
            workdir.mkdir()
            quality = _quality_recipe(recipe, quality_steps, workdir / "quality") if quality_steps else None
            result = _run_worker(_measure_recipe(recipe, data_files[key][0], workdir / "run"), steps, warmup, workdir,
                                 dev, quality)
            _fill(row, result)
            _estimate_row(row, recipe, dev, budget_gib)
            rows.append(row)
            progress.advance(task)
    meta = {"recipe_name": recipe_name, "device": device_info(dev),
            "compute_dtype": pick_compute_dtype(first.model.compute_dtype, dev).value,
            "attn_implementation": pick_attention(first.model.attn_implementation, dev).value, "steps": steps,
            "warmup_steps": warmup, "quality_steps": quality_steps, "budget_gib": budget_gib,
            "versions": package_versions(),
            "process_per_configuration": True,
            "memory_measure": ("CPU: peak live tensor bytes (qlora_phi3/memory/meter.py)" if dev == "cpu" else
                               "CUDA: max_memory_allocated / max_memory_reserved after warm-up; device used = "
                               "total - free at each measured step's end (torch.cuda.mem_get_info)"),
            "recipe": recipe_to_dict(first)}
    choice, why = pick(rows, budget_gib)
    meta["pick"] = {"overrides": None if choice is None else choice.overrides, "why": why}
    return rows, meta


def check_quality_applies(configs: list[tuple[dict, Recipe]], quality_steps: int) -> None:
    """--quality-steps ranks configurations by held-out eval loss; a generating method (grpo) has none."""
    methods = sorted({r.train.method for _, r in configs if METHODS[r.train.method].generates})
    if quality_steps and methods:
        raise UserError(f"--quality-steps does not apply to train.method={methods[0]}: it ranks configurations by "
                        "held-out eval loss, and grpo has none (its held-out measure is the mean reward of sampled "
                        "completions, which a few steps do not move beyond sampling noise, docs/grpo.md); profile "
                        "it without --quality-steps for memory and speed.")


def check_measurable(configs: list[tuple[dict, Recipe]]) -> None:
    """profile measures the training process; with train.generator=vllm the completions are sampled outside it."""
    if any(r.train.samples_with_vllm for _, r in configs):
        raise UserError("profile does not measure train.generator=vllm: vLLM samples in memory of its own "
                        "(train.vllm_gib, docs/grpo.md), which this profile cannot see. Profile the training side "
                        "with train.generator=transformers.")


def _fill(row: ProfileRow, result: dict) -> None:
    row.status = result.get("status", "error")
    row.message = result.get("message", "")
    measured = result.get("measured") or {}
    for name in ("peak_allocated_gib", "peak_reserved_gib", "driver_used_gib", "step_seconds", "tokens_per_second",
                 "baseline_gib"):
        setattr(row, name, measured.get(name))
    row.eval_loss_start, row.eval_loss = result.get("eval_loss_start"), result.get("eval_loss")


def _estimate_row(row: ProfileRow, recipe: Recipe, device: str, budget_gib: float | None) -> None:
    est = estimate(recipe, config_for_estimate(recipe.model), device)
    # Compare like with like: CPU live tensors vs tensor estimate; CUDA reserved vs reserved estimate.
    row.estimated_gib = round(est.reserved_gib, 4)
    if row.status == "ok" and row.peak_reserved_gib:
        row.estimate_error_pct = round(100 * (est.reserved_gib - row.peak_reserved_gib) / row.peak_reserved_gib, 1)
    if budget_gib is None:
        return
    if row.status == "oom":
        row.fits_budget = False
    elif row.driver_used_gib is not None:  # what the card really had in use, CUDA context and paged states included
        row.fits_budget = row.driver_used_gib <= budget_gib
    elif row.peak_reserved_gib is not None:  # CPU: measured tensors + the CUDA terms the estimator would add
        row.fits_budget = row.peak_reserved_gib + (est.total_gib - est.reserved_gib) <= budget_gib
    else:
        row.fits_budget = est.total_gib <= budget_gib


# Eval losses within this share of the best count as ties: a margin for a short run's noise (chosen, not measured).
QUALITY_TIE = 0.01


def pick(rows: list[ProfileRow], budget_gib: float | None) -> tuple[ProfileRow | None, str]:
    """The configuration to choose and why: the lowest eval loss among those that fit (ties: the least memory,
    then the fastest); without a quality run, the fastest that fits."""
    ran = [r for r in rows if r.status == "ok"]
    fitting = [r for r in ran if r.fits_budget is not False]
    if not ran:
        return None, "no configuration ran: nothing to pick (the table says why)"
    if not fitting:
        return None, (f"none of the {len(ran)} configurations that ran fits {budget_gib:.3g} GiB: lower "
                      "data.max_seq_len or train.micro_batch_size, or turn checkpointing on (`qlora-phi3 fit`)")
    scope = (f"of the {len(fitting)} that fit {budget_gib:.3g} GiB" if budget_gib is not None else
             f"of the {len(fitting)} that ran (no --budget)")
    scored = [r for r in fitting if r.eval_loss is not None]
    if not scored:
        choice = max(fitting, key=lambda r: r.tokens_per_second or 0)
        return choice, (f"the fastest {scope}; quality was not measured: --quality-steps N trains each N steps on "
                        "the recipe's data and picks by held-out eval loss")
    best = min(r.eval_loss for r in scored)
    ties = [r for r in scored if r.eval_loss <= best * (1 + QUALITY_TIE)]
    choice = min(ties, key=lambda r: (r.peak_reserved_gib or 0, -(r.tokens_per_second or 0)))
    why = f"the lowest held-out eval loss {scope}: {best:.4f}"
    if len(ties) > 1:
        why = (f"eval loss {choice.eval_loss:.4f}, within {QUALITY_TIE:.0%} of the lowest {scope} ({best:.4f}), "
               f"with the least memory of the {len(ties)} that close")
    return choice, why


def _plot(rows: list[ProfileRow], meta: dict, path: Path) -> None:
    """Against LoRA rank, one line per sequence length (per batch/checkpointing if they vary): peak memory with the
    budget, tokens/s, and the held-out eval loss when a quality run was asked for. Each axis is scaled to its data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = any(r.eval_loss is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if quality else 2, figsize=(12 if quality else 9, 4.2))
    groups: dict[tuple, list[ProfileRow]] = {}
    for r in rows:
        groups.setdefault((r.max_seq_len, r.micro_batch_size, r.gradient_checkpointing), []).append(r)
    vary_other = len({k[1:] for k in groups}) > 1
    # MiB when everything is under 1 GiB (the tiny model), GiB otherwise: readable ticks either way.
    values = [v for r in rows for v in (r.peak_reserved_gib, r.estimated_gib) if v is not None]
    scale, unit = (1024, "MiB") if values and max(values) < 1 else (1, "GiB")
    colors: dict[int, str] = {}
    for (seq, mbs, ckpt), group in sorted(groups.items()):
        color = colors.setdefault(seq, f"C{len(colors)}")
        label = f"seq {seq}" + (f", batch {mbs}, ckpt {ckpt}" if vary_other else "")
        ok = sorted((r for r in group if r.status == "ok"), key=lambda r: r.lora_r)
        style = "-" if ckpt != "false" else "--"
        ranks = [r.lora_r for r in ok]
        if ok:
            axes[0].plot(ranks, [r.peak_reserved_gib * scale for r in ok], style, marker="o", color=color, label=label)
            axes[0].plot(ranks, [r.estimated_gib * scale for r in ok], ":", color=color, alpha=0.6)
            axes[1].plot(ranks, [r.tokens_per_second or 0 for r in ok], style, marker="o", color=color)
        for r in group:
            if r.status != "ok":
                axes[0].plot([r.lora_r], [r.estimated_gib * scale], "x", color=color, markersize=10)
        scored = [r for r in ok if r.eval_loss is not None]
        if quality and scored:
            axes[2].plot([r.lora_r for r in scored], [r.eval_loss for r in scored], style, marker="o", color=color)
    picked = [r for r in rows if (meta.get("pick") or {}).get("overrides") == r.overrides and r.status == "ok"]
    for r in picked:  # the closing line's pick, ringed on every panel
        ring = dict(marker="o", markersize=14, markerfacecolor="none", markeredgecolor="black", label="pick")
        axes[0].plot([r.lora_r], [r.peak_reserved_gib * scale], **ring)
        axes[1].plot([r.lora_r], [r.tokens_per_second or 0], **ring)
        if quality and r.eval_loss is not None:
            axes[2].plot([r.lora_r], [r.eval_loss], **ring)
    _budget_on(axes[0], meta.get("budget_gib"), scale, unit, values)
    on_gpu = meta["device"].get("kind") == "cuda"
    axes[0].set_ylabel(f"peak reserved memory, {unit}" if on_gpu else f"peak live tensor memory, {unit}")
    axes[1].set_ylabel("tokens/s (measured steps)")
    axes[1].set_ylim(bottom=0)
    if quality:
        axes[2].set_ylabel(f"held-out eval loss after {meta.get('quality_steps')} steps")
        axes[2].margins(y=0.15)
    ranks = sorted({r.lora_r for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, labels=[str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta['recipe_name']} on {meta['device'].get('name')}: measured (solid; dashed without "
                 "checkpointing), estimated (dotted), out of memory (x)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _budget_on(ax, budget_gib: float | None, scale: int, unit: str, values: list[float]) -> None:
    """The memory axis scaled to the measured and estimated values (ranks differ by a few percent), and the budget:
    a line where it lies near them; otherwise (most CPU profiles: MiB of tensors against a GiB budget) a thick
    edge and the panel's title say where it is, so the lines keep the axis's height."""
    lo, hi = (min(values) * scale, max(values) * scale) if values else (0.0, 1.0)
    pad = max((hi - lo) * 0.15, hi * 0.03, 1e-9)
    bottom, top = max(0.0, lo - pad), hi + pad
    if budget_gib:
        budget, label = budget_gib * scale, f"budget {budget_gib * scale:.3g} {unit}"
        if bottom - (top - bottom) <= budget <= top + (top - bottom):  # near the data: a line, the axis widened to it
            bottom, top = min(bottom, budget - pad), max(top, budget + pad)
            ax.axhline(budget, color="red", linewidth=1.5, label=label)
        else:
            above = budget > top
            ax.axhline(top if above else bottom, color="red", linewidth=4, alpha=0.5)
            ax.set_title(f"{label}: {budget / top:.1f}x the top, every point fits" if above else
                         f"{label}: below the bottom, no point fits", color="red", fontsize=8)
    ax.set_ylim(max(0.0, bottom), top)


def write_results(rows: list[ProfileRow], meta: dict, out_dir: Path) -> dict[str, Path]:
    """profile.csv, profile.json and profile.png in ``out_dir``, each written whole or not at all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "profile.csv", "json": out_dir / "profile.json", "png": out_dir / "profile.png"}
    names = [f for f in asdict(rows[0]) if f != "overrides"] if rows else []
    with tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", delete=False) as f:
        writer = csv.writer(f)
        writer.writerow(["overrides", *names])
        for r in rows:
            d = asdict(r)
            writer.writerow([" ".join(f"{k}={v}" for k, v in r.overrides.items()), *[d[n] for n in names]])
    atomic_write_text(paths["csv"], Path(f.name).read_text(encoding="utf-8"))
    Path(f.name).unlink()
    atomic_write_json(paths["json"], {**meta, "rows": [asdict(r) for r in rows]})
    tmp_png = paths["png"].with_name(".profile.partial.png")
    _plot(rows, meta, tmp_png)
    os.replace(tmp_png, paths["png"])
    return paths


def _worker(recipe_path: str, result_path: str, warmup: int, steps: int, quality_path: str = "") -> int:
    """One configuration, in this (fresh) process: :func:`qlora_phi3.run.train.measure`, then the quality run if
    ``quality_path`` names one (:func:`qlora_phi3.run.train.train`; the measuring has ended, so it does not count);
    the result as JSON."""
    from qlora_phi3.memory.oom import is_oom
    from qlora_phi3.run.train import measure, train
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    recipe = load_recipe(recipe_path, [])
    try:
        run = measure(recipe, warmup, steps, cpu_memory="tensors")
        result = {"status": "ok", "measured": run["measured"]}
        if quality_path:
            quality = train(load_recipe(quality_path, []), force=True).run
            result.update(eval_loss_start=quality.get("eval_loss_start"), eval_loss=quality.get("eval_loss_end"))
    except RunFailed as e:
        oom = "out of GPU memory" in str(e)
        result = {"status": "oom" if oom else "error", "message": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - recorded in the table; the grid goes on
        result = {"status": "oom" if is_oom(e) else "error", "message": f"{type(e).__name__}: {e}"[:300]}
    atomic_write_json(Path(result_path), result)
    return 0


def _forked_worker(recipe_path: str, result_path: str, warmup: int, steps: int, quality_path: str,
                   log_path: str) -> None:
    """:func:`_worker` in a process forked from the CPU server; its output goes to ``log_path`` (the progress of a
    training run, which the profile's own bar replaces), as a new interpreter's is captured."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.exit(_worker(recipe_path, result_path, warmup, steps, quality_path))


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
