"""The fit planner: the longest sequences and biggest micro-batch predicted to fit a memory budget.

``qlora-phi3 fit RECIPE --budget 12GB`` searches ``data.max_seq_len`` (multiples of 256 up to the
model's context), whether gradient checkpointing is needed, then ``train.micro_batch_size``, with the
analytic estimator (:mod:`qlora_phi3.memory.estimate`, no weights loaded), keeping ``SAFETY_MARGIN`` of
the budget free, and writes the result as a ready recipe. ``train.grad_accum`` is adjusted so the
effective batch (micro_batch_size x grad_accum) stays what the recipe asked for.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from qlora_phi3.config import Recipe, recipe_to_dict
from qlora_phi3.errors import UserError

__all__ = ["FitPlan", "SAFETY_MARGIN", "plan_fit", "run_fit", "write_fit_recipe"]

SAFETY_MARGIN = 0.10  # keep 10% of the budget free: estimator error (see tests) and allocator spikes
SEQ_STEP = 256
MAX_MICRO_BATCH = 64


@dataclass
class FitPlan:
    recipe: Recipe
    budget_gib: float
    usable_gib: float
    predicted_gib: float
    checkpointing_needed: bool
    changes: dict


def _predict(recipe: Recipe, model_config, device: str) -> float:
    from qlora_phi3.memory.estimate import estimate

    return estimate(recipe, model_config, device).total_gib


def _with(recipe: Recipe, seq: int, mbs: int, ckpt) -> Recipe:
    r = copy.deepcopy(recipe)
    r.data.max_seq_len, r.train.micro_batch_size, r.train.gradient_checkpointing = seq, mbs, ckpt
    return r


def plan_fit(recipe: Recipe, model_config, budget_gib: float, device: str = "cuda",
             margin: float = SAFETY_MARGIN) -> FitPlan:
    """Largest max_seq_len first (with checkpointing if it is needed), then the largest micro-batch."""
    usable = budget_gib * (1 - margin)
    context = getattr(model_config, "max_position_embeddings", None) or 4096
    seqs = list(range(SEQ_STEP, context + 1, SEQ_STEP)) or [context]
    # Checkpointing costs ~30% more compute: use it only when needed. 'offload' (if asked for) saves more on a GPU.
    ckpt_on = recipe.train.gradient_checkpointing or True
    best_seq = max((s for s in seqs if _predict(_with(recipe, s, 1, ckpt_on), model_config, device) <= usable),
                   default=None)
    if best_seq is None:
        floor = _predict(_with(recipe, seqs[0], 1, ckpt_on), model_config, device)
        raise UserError(f"--budget {budget_gib:g} GiB: even data.max_seq_len={seqs[0]} with micro_batch_size=1 and "
                        f"checkpointing is predicted to need {floor:.2f} GiB (plus the {margin:.0%} safety margin). "
                        "Use a bigger card, or a smaller lora.r / train.optimizer=paged_adamw_8bit.")
    fits_without = _predict(_with(recipe, best_seq, 1, False), model_config, device) <= usable
    ckpt = False if fits_without else ckpt_on
    mbs = 1
    while mbs < MAX_MICRO_BATCH and _predict(_with(recipe, best_seq, mbs + 1, ckpt), model_config, device) <= usable:
        mbs += 1
    effective = recipe.train.micro_batch_size * recipe.train.grad_accum
    planned = _with(recipe, best_seq, mbs, ckpt)
    planned.train.grad_accum = max(1, round(effective / mbs))
    changes = {k: v for k, v in {
        "data.max_seq_len": (recipe.data.max_seq_len, best_seq),
        "train.micro_batch_size": (recipe.train.micro_batch_size, mbs),
        "train.grad_accum": (recipe.train.grad_accum, planned.train.grad_accum),
        "train.gradient_checkpointing": (recipe.train.gradient_checkpointing, ckpt)}.items()}
    return FitPlan(planned, budget_gib, usable, _predict(planned, model_config, device), ckpt is not False, changes)


def write_fit_recipe(plan: FitPlan, source: str, out_path: Path, command: str) -> Path:
    """A self-documenting recipe: header with the command and the predicted peak, the changed keys commented."""
    out_path = Path(out_path)
    header = [
        f"# Fitted by qlora-phi3 for a {plan.budget_gib:g} GiB budget from {source}.",
        "#",
        f"#   {command}",
        f"#   qlora-phi3 train {out_path}",
        "#",
        f"# Predicted peak: {plan.predicted_gib:.2f} GiB (analytic estimate incl. CUDA context; "
        f"{SAFETY_MARGIN:.0%} of the budget kept free, i.e. at most {plan.usable_gib:.2f} GiB planned).",
        "# Check it on your card with: qlora-phi3 profile " + str(out_path) + " --steps 3",
    ]
    body = yaml.safe_dump(recipe_to_dict(plan.recipe), sort_keys=False).splitlines()
    section, lines = None, []
    for line in body:
        if not line.startswith(" "):
            section = line.rstrip(":")
        key = f"{section}.{line.strip().split(':', 1)[0]}"
        if line.startswith("  ") and key in plan.changes:
            old, new = plan.changes[key]
            line += f"  # fit: {old} -> {new}" if old != new else "  # fit: unchanged"
        lines.append(line)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(header + lines) + "\n")
    os.replace(tmp, out_path)
    return out_path


def run_fit(recipe_path: str | None, overrides: list[str], budget: str, out: str | None) -> tuple[FitPlan, Path]:
    """The ``qlora-phi3 fit`` command."""
    from qlora_phi3.config import load_recipe
    from qlora_phi3.memory.estimate import config_for_estimate
    from qlora_phi3.ui import info
    from qlora_phi3.units import gib, parse_size

    budget_gib = gib(parse_size(budget, "--budget"))
    recipe = load_recipe(recipe_path, overrides)
    plan = plan_fit(recipe, config_for_estimate(recipe.model), budget_gib)
    stem = Path(recipe_path).stem if recipe_path else "tiny_cpu"
    out_path = Path(out) if out else Path(f"{stem}_fit_{budget_gib:g}gib.yaml")
    command = " ".join(["qlora-phi3 fit", recipe_path or "", *overrides, f"--budget {budget}"]).replace("  ", " ")
    write_fit_recipe(plan, recipe_path or "the default recipe", out_path, command)
    for key, (old, new) in plan.changes.items():
        info(f"  {key}: {old} -> [bold]{new}[/]" if old != new else f"  {key}: {new} (unchanged)")
    info(f"predicted peak {plan.predicted_gib:.2f} GiB of {budget_gib:g} GiB (safety margin {SAFETY_MARGIN:.0%}); "
         f"checkpointing {'needed' if plan.checkpointing_needed else 'not needed'}")
    info(f"recipe written: [bold]{out_path}[/]   train with: qlora-phi3 train {out_path}")
    return plan, out_path
