"""The fit planner: the longest sequences and biggest micro-batch predicted to fit a memory budget.

``qlora-phi3 fit RECIPE --budget 12GB`` searches ``data.max_seq_len`` (multiples of 256 up to the
model's context), whether gradient checkpointing is needed, then ``train.micro_batch_size``, with the
analytic estimator (:mod:`qlora_phi3.memory.estimate`, no weights loaded), keeping ``SAFETY_MARGIN`` of
the budget free, and writes the result as a ready recipe. ``train.grad_accum`` is adjusted so the
effective batch (micro_batch_size x grad_accum) stays exactly what the recipe asked for (only micro-batches
that divide it are planned). ``data.max_seq_len`` never goes past the data's longest conversation when the
data is readable here; sequence tiling (``train.tile_tokens``) is turned on only when it lets a longer row fit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlora_phi3.config import Recipe, recipe_to_dict
from qlora_phi3.errors import UserError
from qlora_phi3.files import atomic_write_text
from qlora_phi3.methods import METHODS

__all__ = ["FitPlan", "FitReport", "SAFETY_MARGIN", "data_longest_tokens", "plan_fit", "run_fit", "write_fit_recipe"]

SAFETY_MARGIN = 0.10  # keep 10% of the budget free: estimator error (see tests) and allocator spikes
SEQ_STEP = 256
MAX_MICRO_BATCH = 64
TILE_TOKENS = 2048  # train.tile_tokens fit turns on when only tiling lets a longer row fit (see run/tiling.py)


@dataclass
class FitPlan:
    recipe: Recipe
    budget_gib: float
    usable_gib: float
    predicted_gib: float
    checkpointing_needed: bool
    changes: dict
    notes: list[str] = field(default_factory=list)  # what the plan assumed or could not keep, said to the user


@dataclass
class FitReport:
    """What ``qlora-phi3 fit`` planned, and the recipe file it wrote."""
    plan: FitPlan
    recipe_path: Path


def _predict(recipe: Recipe, model_config, device: str) -> float:
    from qlora_phi3.memory.estimate import estimate

    return estimate(recipe, model_config, device).total_gib


def _with(recipe: Recipe, seq: int, mbs: int, ckpt, tile: int | None = None) -> Recipe:
    r = copy.deepcopy(recipe)
    r.data.max_seq_len, r.train.micro_batch_size, r.train.gradient_checkpointing = seq, mbs, ckpt
    # The effective batch stays: a generating method (grpo) samples all of it in one round, so its memory counts it.
    r.train.grad_accum = max(1, recipe.train.micro_batch_size * recipe.train.grad_accum // mbs)
    if tile is not None:
        r.train.tile_tokens = tile
    return r


def data_longest_tokens(recipe: Recipe) -> tuple[int | None, str]:
    """Token length of the longest conversation in the recipe's data (None when it cannot be read here: a Hub
    dataset, or a model whose tokenizer is not on this machine), and a line saying which."""
    from pathlib import Path

    from qlora_phi3.config import EMBEDDED_DATA

    path = recipe.data.path
    if path != EMBEDDED_DATA and not Path(path).expanduser().exists():
        return None, f"data.path={path} is not a local file: data.max_seq_len is planned from memory alone"
    try:
        from qlora_phi3.data.encode import encode_records
        from qlora_phi3.data.read import load_records
        from qlora_phi3.model.load import load_tokenizer

        tokenizer = load_tokenizer(recipe.model)
        records, _ = load_records(recipe.data)
    except UserError as e:
        return None, f"could not measure the data's lengths ({str(e).splitlines()[0][:160]}): planned from memory alone"
    if recipe.data.max_samples:
        records = records[: recipe.data.max_samples]
    enc = encode_records(records, tokenizer, 10**9)  # no truncation: the real lengths
    longest = max((len(x) for x in enc.input_ids), default=None)
    return longest, f"the data's longest conversation is {longest:,} tokens ({len(enc.input_ids):,} conversations)"


def plan_fit(recipe: Recipe, model_config, budget_gib: float, device: str = "cuda",
             margin: float = SAFETY_MARGIN, longest_tokens: int | None = None) -> FitPlan:
    """Largest max_seq_len first (with checkpointing, then tiling, only if needed), then the largest micro-batch
    that keeps the effective batch (micro_batch_size x grad_accum) exactly.

    ``longest_tokens``: the data's longest conversation; max_seq_len is never planned past it (rounded up to
    ``SEQ_STEP``), since longer rows would hold nothing more (with packing they would only pack more per row,
    which changes the batch)."""
    from qlora_phi3.memory.estimate import resolve_attention

    usable = budget_gib * (1 - margin)
    notes = []
    context = getattr(model_config, "max_position_embeddings", None) or 4096
    cap = context
    if longest_tokens:
        cap = min(context, -(-longest_tokens // SEQ_STEP) * SEQ_STEP)
    seqs = list(range(SEQ_STEP, cap + 1, SEQ_STEP)) or [cap]
    if METHODS[recipe.train.method].generates:  # its rows are prompt + completion, set by the task: kept
        seqs = [recipe.data.max_seq_len]
        notes.append(f"data.max_seq_len kept at {recipe.data.max_seq_len} (prompt + train.max_completion_len); "
                     "generation's KV cache grows with train.max_completion_len and the effective batch")
    attn = resolve_attention(recipe, device)
    packing = recipe.data.packing and METHODS[recipe.train.method].packs  # preference rows are never packed
    if attn == "eager" or (attn == "sdpa" and packing):
        notes.append(f"attention {attn}{' with packing' if packing else ''}: memory grows with the square "
                     "of data.max_seq_len (counted); flash_attention_2 or data.packing=false avoids it")
    # Checkpointing costs ~30% more compute and tiling a little more: each only when needed. 'offload' (if asked
    # for) saves more on a GPU.
    ckpt_on = recipe.train.gradient_checkpointing or True
    tile_on = recipe.train.tile_tokens or TILE_TOKENS

    def longest_fitting(tile):
        return max((s for s in seqs if _predict(_with(recipe, s, 1, ckpt_on, tile), model_config, device) <= usable),
                   default=None)

    best_seq = longest_fitting(recipe.train.tile_tokens)
    tile = recipe.train.tile_tokens
    if not tile:
        tiled_seq = longest_fitting(tile_on)
        if tiled_seq is not None and (best_seq is None or tiled_seq > best_seq):
            best_seq, tile = tiled_seq, tile_on
    if best_seq is None:
        floor = _predict(_with(recipe, seqs[0], 1, ckpt_on, tile_on), model_config, device)
        raise UserError(f"--budget {budget_gib:g} GiB: even data.max_seq_len={seqs[0]} with micro_batch_size=1 and "
                        f"checkpointing is predicted to need {floor:.2f} GiB (plus the {margin:.0%} safety margin). "
                        "Use a bigger card, or a smaller lora.r / train.optimizer=paged_adamw_8bit.")
    fits_without = _predict(_with(recipe, best_seq, 1, False, tile), model_config, device) <= usable
    ckpt = False if fits_without else ckpt_on
    effective = recipe.train.micro_batch_size * recipe.train.grad_accum
    # Only micro-batches that divide the effective batch keep it exactly (2 x 8 must not become 3 x 5 = 15).
    mbs = max(m for m in range(1, min(effective, MAX_MICRO_BATCH) + 1)
              if effective % m == 0 and (m == 1 or _predict(_with(recipe, best_seq, m, ckpt, tile), model_config,
                                                            device) <= usable))
    planned = _with(recipe, best_seq, mbs, ckpt, tile)
    planned.train.grad_accum = effective // mbs
    larger = mbs < MAX_MICRO_BATCH and _predict(_with(recipe, best_seq, mbs + 1, ckpt, tile), model_config,
                                                device) <= usable
    if larger and effective % (mbs + 1):
        notes.append(f"micro_batch_size {mbs + 1} would fit too, but only divisors of the effective batch "
                     f"({effective}) keep it exactly; raise train.grad_accum to change the batch yourself")
    if longest_tokens and best_seq == cap and cap < context:
        notes.append(f"data.max_seq_len stops at {best_seq}: the data's longest conversation is {longest_tokens:,} "
                     "tokens")
    changes = {
        "data.max_seq_len": (recipe.data.max_seq_len, best_seq),
        "train.micro_batch_size": (recipe.train.micro_batch_size, mbs),
        "train.grad_accum": (recipe.train.grad_accum, planned.train.grad_accum),
        "train.gradient_checkpointing": (recipe.train.gradient_checkpointing, ckpt),
        "train.tile_tokens": (recipe.train.tile_tokens, tile)}
    return FitPlan(planned, budget_gib, usable, _predict(planned, model_config, device), ckpt is not False, changes,
                   notes)


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
    ] + [f"# Note: {note}" for note in plan.notes]
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
    atomic_write_text(out_path, "\n".join(header + lines) + "\n")  # with the umask's mode, not mkstemp's 0600
    return out_path


def run_fit(recipe_path: str | None, overrides: list[str], budget: str, out: str | None) -> FitReport:
    """The ``qlora-phi3 fit`` command: plan the recipe for ``budget`` (e.g. "12GiB") and write the fitted recipe
    to ``out`` (default: ./<recipe>_fit_<budget>gib.yaml)."""
    from qlora_phi3.config import load_recipe
    from qlora_phi3.memory.estimate import config_for_estimate
    from qlora_phi3.ui import info
    from qlora_phi3.units import gib, parse_size

    budget_gib = gib(parse_size(budget, "--budget"))
    recipe = load_recipe(recipe_path, overrides)
    longest, data_note = data_longest_tokens(recipe)
    # Said as soon as it is measured: reading the model's config (next) may have its own line to say.
    info(f"data: {data_note}")
    plan = plan_fit(recipe, config_for_estimate(recipe.model), budget_gib, longest_tokens=longest)
    stem = Path(recipe_path).stem if recipe_path else "tiny_cpu"
    out_path = Path(out) if out else Path(f"{stem}_fit_{budget_gib:g}gib.yaml")
    command = " ".join(["qlora-phi3 fit", recipe_path or "", *overrides, f"--budget {budget}"]).replace("  ", " ")
    write_fit_recipe(plan, recipe_path or "the default recipe", out_path, command)
    return FitReport(plan, out_path)
