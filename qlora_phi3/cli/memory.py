"""``estimate``, ``fit`` and ``profile``: what fits on a card, predicted and measured."""

from __future__ import annotations

from pathlib import Path

from qlora_phi3.cli.common import add_recipe_args, recipe_and_overrides, recipe_from_args

__all__ = ["PEAK_MEANS", "estimate_table", "print_fit_report", "profile_table", "register", "show_estimate"]


def register(sub) -> None:
    p = sub.add_parser("estimate", help="predict peak memory of a recipe on its device (a GPU, or the CPU for a CPU "
                                        "recipe) from the model config alone (no weights loaded), with a breakdown")
    add_recipe_args(p)
    p.add_argument("--budget", metavar="SIZE", help="memory to fit in: 12GiB (a 12 GB card), or 12GB = 12 x 10^9 bytes")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="what to estimate for (default: the recipe's train.device; auto = cuda): cuda adds the "
                        "CUDA context and allocator overhead; cpu: live tensors only")
    p.set_defaults(func=_estimate)

    p = sub.add_parser("fit", help="largest max_seq_len and micro_batch_size predicted to fit a memory budget, "
                                   "written as a ready recipe")
    add_recipe_args(p)
    p.add_argument("--budget", metavar="SIZE", required=True, help="GPU memory: 12GiB (a 12 GB card), 8GiB, 12GB")
    p.add_argument("--out", metavar="FILE", help="recipe to write (default: ./<recipe>_fit_<budget>gib.yaml)")
    p.set_defaults(func=_fit)

    p = sub.add_parser("profile", help="measure peak memory and tokens/s of real training steps over a grid of "
                                       "settings, beside the estimate")
    add_recipe_args(p)
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="recipe keys and values to combine, e.g. lora.r=8,16,64 data.max_seq_len=512,2048 "
                        "train.micro_batch_size=1,2 train.gradient_checkpointing=true,false (put overrides before "
                        "--grid: it takes every KEY=V that follows it)")
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps per configuration (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per configuration, not measured (default 1)")
    p.add_argument("--budget", metavar="SIZE", help="memory budget to check each configuration against, e.g. 12GiB")
    p.add_argument("--quality-steps", type=int, default=0, metavar="N",
                   help="also train each configuration N steps on the recipe's data and record its held-out eval "
                        "loss, to choose a rank by quality as well as memory and speed (default 0: off)")
    p.add_argument("--out", metavar="DIR", help="folder for profile.csv/json/png (default: profiles/<recipe name>)")
    p.set_defaults(func=_profile)


def _budget_gib(text: str | None) -> float | None:
    from qlora_phi3.units import gib, parse_size

    return None if text is None else gib(parse_size(text, "--budget"))


def _estimate(args) -> int:
    from qlora_phi3.ui import console, info

    budget_gib = _budget_gib(args.budget)
    est = show_estimate(recipe_from_args(args), args.device, console())
    if budget_gib is None:
        return 0
    fits = est.fits(budget_gib)
    verdict = "[green]fits[/]" if fits else "[red]does not fit[/]"
    info(f"{verdict}: {est.total_gib:.2f} GiB predicted of a {budget_gib:.2f} GiB budget"
         + ("" if fits else "; `qlora-phi3 fit RECIPE --budget ...` finds settings that do."))
    return 0 if fits else 1


def show_estimate(recipe, device: str | None, out):
    """Print the estimate for ``device`` (None: the recipe's, :func:`estimate_device`) on the rich console ``out``:
    the breakdown, then which device and why, and what the peak is beside the other memory figures."""
    from qlora_phi3.memory.estimate import config_for_estimate, estimate, estimate_device

    device, why = estimate_device(recipe, device)
    est = estimate(recipe, config_for_estimate(recipe.model), device)
    out.print(estimate_table(recipe, est))
    out.print(f"for {est.device}: {why}. {PEAK_MEANS[est.device]}")
    return est


# What each device's peak is, and how it relates to the other memory figures (docs/memory.md, "Which memory").
PEAK_MEANS = {
    "cpu": "The peak counts live tensors (what `profile` measures on a CPU); `train` on a CPU reports the "
           "process's peak RSS, which adds the Python runtime, libraries, data and allocator caches on top.",
    "cuda": "The peak is CUDA reserved (tensors + the allocator's cache, `profile`'s rsrvd and `train`'s second "
            "figure) + the CUDA context: what nvidia-smi shows as used (`profile`'s used), checked against --budget.",
}


def estimate_table(recipe, est):
    """The estimate's breakdown: every term with its size and formula, then the peak."""
    from rich.markup import escape
    from rich.table import Table

    from qlora_phi3.methods import METHODS

    s = est.settings
    # auto on a GPU is bf16 or, before Ampere, fp16: the same bytes, and no GPU is asked which
    compute = ("16-bit (bf16, or fp16 before Ampere)" if est.device == "cuda" and recipe.model.compute_dtype == "auto"
               else s["compute_dtype"])
    chats = METHODS[s["method"]].data == "chat"
    rows = "" if chats else f" ({s['rows_per_forward']} rows), {s['method']}"  # chosen + rejected rows
    table = Table(title=f"estimated peak memory: {recipe.model.name_or_path}, seq {s['max_seq_len']} x batch "
                        f"{s['micro_batch_size']}{' packed' if s['packing'] else ''}{rows}, r={s['lora_r']}, checkpointing "
                        f"{s['gradient_checkpointing']}, tiles {s['tile_tokens'] or 'off'}, {s['optimizer']}, attention "
                        f"{s['attn_implementation']}, compute {compute} ({est.device})",
                  title_justify="left")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("formula (source in qlora_phi3/memory/estimate.py)", overflow="fold")
    for t in est.terms:
        table.add_row(t.name, f"{t.gib:.3f}", escape(t.formula))
    table.add_row("[bold]peak", f"[bold]{est.total_gib:.2f}",
                  "weights + saved activations + masks + max(final norm + logits and loss, recompute + backward "
                  "transients [+ attention backward buffers])" + (" + overhead + context" if est.device == "cuda" else ""))
    return table


def _fit(args) -> int:
    from qlora_phi3.memory.fit import run_fit

    path, overrides = recipe_and_overrides(args)
    print_fit_report(run_fit(str(path), overrides, args.budget, args.out))
    return 0


def print_fit_report(report) -> None:
    """Each planned key old -> new, the plan's notes, the effective batch it kept and the predicted peak."""
    from qlora_phi3.memory.fit import SAFETY_MARGIN
    from qlora_phi3.methods import METHODS
    from qlora_phi3.ui import info

    plan, out_path = report.plan, report.recipe_path
    for key, (old, new) in plan.changes.items():
        info(f"  {key}: {old} -> [bold]{new}[/]" if old != new else f"  {key}: {new} (unchanged)")
    for note in plan.notes:
        info(f"  note: {note}")
    t, d = plan.recipe.train, plan.recipe.data
    method = METHODS[t.method]
    rows = t.micro_batch_size * t.grad_accum
    per_step = (f"{rows} packed rows of {d.max_seq_len:,} tokens ({rows * d.max_seq_len:,} tokens) per optimizer step"
                if d.packing and method.packs else
                f"{rows} {'conversations' if method.data == 'chat' else 'completions' if method.generates else 'preference records'} "
                f"per optimizer step")
    info(f"effective batch kept: {t.micro_batch_size} x {t.grad_accum} = {per_step}")
    info(f"predicted peak {plan.predicted_gib:.2f} GiB of {plan.budget_gib:g} GiB (safety margin {SAFETY_MARGIN:.0%}); "
         f"checkpointing {'needed' if plan.checkpointing_needed else 'not needed'}")
    info(f"recipe written: [bold]{out_path}[/]   train with: qlora-phi3 train {out_path}")


def _profile(args) -> int:
    from qlora_phi3.run.profile import check_measurable, check_quality_applies, grid_recipes, profile, write_results
    from qlora_phi3.ui import console, info, warn

    path, overrides = recipe_and_overrides(args)
    budget_gib = _budget_gib(args.budget)
    configs = grid_recipes(path, overrides, args.grid)
    check_quality_applies(configs, args.quality_steps)  # before the plan is announced
    check_measurable(configs)
    out = Path(args.out) if args.out else Path("profiles") / path.stem
    quality = (f", then {args.quality_steps} step(s) on the recipe's data for the held-out eval loss"
               if args.quality_steps else "")
    info(f"profiling {len(configs)} configuration(s), each in a fresh process: {args.warmup} warm-up + "
         f"{args.steps} measured optimizer step(s) of `qlora-phi3 train`{quality}")
    rows, meta = profile(configs, args.steps, args.warmup, budget_gib, recipe_name=path.stem,
                         quality_steps=args.quality_steps)
    console().print(profile_table(rows, meta))
    paths = write_results(rows, meta, out)
    for row in rows:
        if row.status == "error":
            warn(f"{row.overrides}: {row.message}")
    info(f"results: {paths['csv']}, {paths['json']}, {paths['png']}")
    choice, why = meta["pick"]["overrides"], meta["pick"]["why"]
    named = " ".join(f"{k}={v}" for k, v in (choice or {}).items())
    info(f"pick: [bold]{named or 'the recipe as it is'}[/] ({why})" if choice is not None else f"pick: none ({why})")
    return 0


# Grid keys the table shows from the row's own fields, and short column names for other axes (80 columns).
_ROW_KEYS = ("lora.r", "data.max_seq_len", "train.micro_batch_size", "train.gradient_checkpointing")
_SHORT_KEYS = {"train.max_completion_len": "compl", "train.num_generations": "group", "train.grad_accum": "accum"}


def profile_table(rows, meta: dict):
    """Measured beside estimated, error, speed, and whether each fits the budget, in at most 80 columns: the
    settings that are the same on every row go to the caption, GPU rows add reserved and device-used memory."""
    from rich.table import Table

    on_gpu = meta["device"].get("kind") == "cuda"
    budget = meta.get("budget_gib")
    mem = "{:.2f}" if on_gpu else "{:.3f}"
    settings = {"r": [str(r.lora_r) for r in rows], "seq": [str(r.max_seq_len) for r in rows],
                "mbs": [str(r.micro_batch_size) for r in rows], "ckpt": [r.gradient_checkpointing for r in rows]}
    for key in dict.fromkeys(k for r in rows for k in r.overrides):  # other grid axes, e.g. grpo's completion length
        if key not in _ROW_KEYS:
            settings[_SHORT_KEYS.get(key, key.split(".")[-1])] = [str(r.overrides.get(key, "-")) for r in rows]
    varying = [k for k, v in settings.items() if len(set(v)) > 1] or ["seq"]
    fixed = [f"{k} {v[0]}" for k, v in settings.items() if k not in varying]
    quality = any(r.eval_loss is not None for r in rows)
    table = Table(title=f"profile of {meta['recipe_name']} on {meta['device'].get('name')}"
                        f" ({'GiB' if on_gpu else 'GiB of live tensors'})", title_justify="left",
                  box=None, pad_edge=False, padding=(0, 1), header_style="bold underline")
    cols = varying + ["status", "alloc" if on_gpu else "peak"] + (["rsrvd", "used"] if on_gpu else []) + \
        ["est.", "err", "tok/s"] + (["eval"] if quality else []) + (["fits"] if budget else [])  # step s: in the csv
    for c in cols:
        table.add_column(c, justify="left" if c in ("ckpt", "status") else "right", no_wrap=True)

    def num(x, fmt):
        return "-" if x is None else fmt.format(x)

    for i, r in enumerate(rows):
        cells = [settings[k][i] for k in varying]
        cells += [{"ok": "ok", "oom": "[red]OOM", "error": "[red]error"}[r.status], num(r.peak_allocated_gib, mem)]
        if on_gpu:
            cells += [num(r.peak_reserved_gib, mem), num(r.driver_used_gib, mem)]
        cells += [num(r.estimated_gib, mem), num(r.estimate_error_pct, "{:+.0f}%"), num(r.tokens_per_second, "{:,.0f}")]
        if quality:
            cells.append(num(r.eval_loss, "{:.4f}"))
        if budget:
            cells.append("-" if r.fits_budget is None else "[green]yes" if r.fits_budget else "[red]no")
        table.add_row(*cells)
    table.caption = "; ".join(([", ".join(fixed)] if fixed else []) + [
        "mbs = micro-batch, est. = estimate, err = (est. - measured) / measured"
        + (f", eval = held-out loss after {meta.get('quality_steps')} steps (start "
           f"{_start_losses(rows)})" if quality else "")
        + (f", fits = within {budget:.3g} GiB" if budget else "")] + [_MEMORY_WORDS[on_gpu]])
    table.caption_justify = "left"
    return table


def _start_losses(rows) -> str:
    """The eval loss before training: the same for every rank of one sequence length (LoRA's B starts at zero)."""
    starts = sorted({round(r.eval_loss_start, 4) for r in rows if r.eval_loss_start is not None})
    return "-" if not starts else f"{starts[0]:.4f}" if len(starts) == 1 else f"{starts[0]:.4f}-{starts[-1]:.4f}"


# What the table's memory columns are, and how they relate to `estimate` and `train` (docs/memory.md, "Which memory").
_MEMORY_WORDS = {
    False: "peak = live tensors, what `estimate` predicts on a CPU; `train` shows the process RSS, larger",
    True: "alloc/rsrvd = CUDA allocated/reserved, used = driver used (reserved + context: nvidia-smi, "
          "`estimate`'s peak, what fits checks)",
}
