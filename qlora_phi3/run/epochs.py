"""How much of its data a run sees, said before it starts, with a warning when that is far from what the data needs.

A step count copied from a recipe goes wrong on small data both ways: the Phi-3 recipes' 1,000 steps were made for
a 200k-conversation data set and are dozens of passes over a few hundred conversations of one's own, and a short
try of the embedded tiny model on 40 conversations stops before it has learnt anything. The rules, in docs/data.md:

* **far too long**: more than :data:`MAX_EPOCHS` passes over the training data on a pretrained base. LoRA
  fine-tunes usually take 1 to 3; well past that the model learns the training answers by heart and the eval loss
  climbs again. The fix offered: :data:`SUGGESTED_EPOCHS` passes.
* **far too short**: less than one pass over a small data set (at most :data:`SMALL_DATA` training records), so part
  of it is never seen although seeing all of it is cheap. A large data set is often trained on for a fraction of a
  pass: no warning there. The fix offered: :data:`SUGGESTED_EPOCHS` passes.
* the embedded tiny model starts from random weights, so it needs optimizer steps more than passes: fewer than
  :data:`MIN_RANDOM_BASE_STEPS` warns, however small the data (not when it continues a trained adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlora_phi3.config import EMBEDDED_MODEL, Recipe
from qlora_phi3.methods import METHODS
from qlora_phi3.ui import info, warn

__all__ = ["Coverage", "MAX_EPOCHS", "MIN_RANDOM_BASE_STEPS", "SMALL_DATA", "SUGGESTED_EPOCHS", "coverage_warning",
           "epoch_coverage", "say_coverage"]

# What one record of each data kind (methods.DATA_KINDS) is called in the plan line.
UNIT_OF_DATA = {"chat": "conversations", "pairs": "preference pairs", "unpaired": "labelled answers", "prompts": "prompts"}

MAX_EPOCHS = 10
SUGGESTED_EPOCHS = 3
SMALL_DATA = 10_000  # training records (conversations, pairs): below this, one whole pass is cheap
# Seen on the embedded model (a user's trial of issue 35): 40 steps on 40 conversations left it answering gibberish,
# 200 steps answered correctly; the tiny_cpu recipe's 300 steps reach eval loss 0.12 on the bundled set.
MIN_RANDOM_BASE_STEPS = 200


@dataclass
class Coverage:
    steps: int  # optimizer steps the run will make in all
    steps_per_epoch: int
    rows_per_epoch: int  # training rows the trainer iterates (packed rows when packing)

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch


def epoch_coverage(recipe: Recipe, rows_per_epoch: int, world_size: int = 1) -> Coverage:
    """Steps and passes as transformers' Trainer counts them: batches of ``micro_batch_size`` rows per process
    (the last one partial), ``grad_accum`` batches per optimizer step, ``train.epochs`` when max_steps is -1."""
    t = recipe.train
    batches = math.ceil(rows_per_epoch / (t.micro_batch_size * world_size))
    per_epoch = max(batches // t.grad_accum, 1)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * per_epoch)
    return Coverage(steps, per_epoch, rows_per_epoch)


def coverage_warning(recipe: Recipe, cov: Coverage, n_train: int, unit: str) -> str | None:
    """The warning for a run far too short or far too long for its data (module docstring), with the override that
    fixes it; None when the run is in range."""
    suggested = f"train.max_steps={max(SUGGESTED_EPOCHS * cov.steps_per_epoch, 1)}"
    if recipe.model.name_or_path == EMBEDDED_MODEL and not recipe.model.adapter:  # a continued adapter has learnt
        if cov.steps < MIN_RANDOM_BASE_STEPS:
            return (f"{cov.steps} optimizer steps is far too short for the embedded tiny model: it starts from random "
                    f"weights and needs about {MIN_RANDOM_BASE_STEPS} steps, however small the data, before its "
                    f"answers make sense. Set train.max_steps={MIN_RANDOM_BASE_STEPS} or more.")
        return None
    if cov.epochs > MAX_EPOCHS:
        return (f"{cov.epochs:.0f} passes over {n_train:,} train {unit} is far too long: a pretrained model learns "
                f"so few by heart well before (the eval loss climbs again), and LoRA fine-tunes usually take 1 to "
                f"{SUGGESTED_EPOCHS}. For {SUGGESTED_EPOCHS} passes set {suggested}.")
    if cov.epochs < 1 and n_train <= SMALL_DATA:
        return (f"{cov.epochs:.0%} of one pass over {n_train:,} train {unit} is far too short: the rest is never "
                f"seen, though a data set this small is cheap to see whole. For {SUGGESTED_EPOCHS} passes set "
                f"{suggested}.")
    return None


def say_coverage(recipe: Recipe, cov: Coverage, data) -> dict:
    """Print the run's plan (steps, passes, train and eval size with their tokens with loss) and the warning, if
    any; returns run.json's ``plan`` fields. ``data`` is the method's MethodData."""
    n_train, n_eval = data.dataset["train_samples"], data.dataset["eval_samples"]
    method = METHODS[recipe.train.method]
    unit = UNIT_OF_DATA[method.data]
    packed = method.packs and recipe.data.packing
    rows = f", {cov.rows_per_epoch:,} packed rows" if packed else ""
    eval_every = f"every {recipe.train.eval_steps} steps and at the end" if recipe.train.eval_steps else "at the end"
    info(f"plan: {cov.steps:,} optimizer steps = {cov.epochs:.2g} epochs ({cov.steps_per_epoch:,} steps per pass over "
         f"{n_train:,} train {unit}{rows}{_label_tokens(data.train)}); eval {eval_every} on {n_eval:,} held-out "
         f"{unit}{_label_tokens(data.eval)}")
    warning = coverage_warning(recipe, cov, n_train, unit)
    if warning:
        warn(warning)
    return {"steps": cov.steps, "steps_per_epoch": cov.steps_per_epoch, "epochs": round(cov.epochs, 3),
            "warning": warning}


def _label_tokens(split) -> str:
    n = getattr(split, "n_label_tokens", None)
    return f", {n:,} tokens with loss" if isinstance(n, int) else ""
