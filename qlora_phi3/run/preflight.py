"""The checks ``train`` makes in about a second, before torch and transformers load (tens of seconds on a small CPU).

A mistake in a file or a directory used to be answered after the heavy imports, 30 s after a key typo would
have been. :func:`preflight` runs, with no heavy import, the checks that need none: the recipe's values (already
checked by ``load_recipe``), the run directory (:func:`qlora_phi3.run.rundir.prepare_run_dir`), the data file's
whole-file checks (:func:`qlora_phi3.data.read.check_data_file`) and its records one by one, as the method reads them
(:func:`qlora_phi3.data.split.read_training_records`: data with no usable record, or too many bad ones, is refused
now; a Hub dataset needs the datasets library, not torch), ``data.max_seq_len`` against the model's context when
its ``config.json`` is on disk or published, the LoRA variant and a continued adapter's shape (files only:
:func:`qlora_phi3.model.lora.check_lora_variant`, :func:`qlora_phi3.model.lora.check_adapter_fits`) and whether
the trackers are installed (:func:`check_trackers`, which imports none of them).

What it found is handed on (:class:`Checked`): :func:`qlora_phi3.run.train.setup` takes the run directory's plan,
the records it read (the file is read once) and the context it checked, and runs :func:`preflight` itself when a
library caller gives it none, so the messages are the same either way.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.config import EMBEDDED_MODEL, ModelConfig, Recipe, with_absolute_paths
from qlora_phi3.data.read import LoadReport, check_data_file
from qlora_phi3.data.split import read_training_records
from qlora_phi3.errors import UserError
from qlora_phi3.family import published
from qlora_phi3.model.lora import check_adapter_fits, check_lora_variant
from qlora_phi3.run.rundir import RunDir, prepare_run_dir

__all__ = ["Checked", "check_context", "check_trackers", "known_context", "preflight", "trackers"]

# tracker -> (module that must import, pip extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` established for one recipe, so that setup neither reads nor checks it again."""
    given: Recipe  # the recipe and flags it checked: setup takes the rest only for these
    resume: bool
    force: bool
    plan: RunDir  # the run directory's plan; plan.recipe is the recipe to run (on --resume, the run's own)
    records: tuple[list, LoadReport]  # the training split's records, read and validated, and their report
    context: int | None  # the context data.max_seq_len was checked against; None: only transformers can say

    def is_for(self, recipe: Recipe, resume: bool, force: bool) -> bool:
        return self.given is recipe and (self.resume, self.force) == (resume, force)


def preflight(recipe: Recipe, resume: bool = False, force: bool = False, *, measuring: bool = False) -> Checked:
    """Refuse, with the same one-line messages as :func:`qlora_phi3.run.train.setup`, what can be known wrong
    without loading torch: the run directory, the data and its records, the context length, the LoRA variant, a
    continued adapter's shape, the trackers (not when ``measuring``: a measurement reports to none). Writes
    nothing. Returns what it found, for setup (:class:`Checked`)."""
    plan = prepare_run_dir(recipe, resume, force)
    run_recipe = with_absolute_paths(plan.recipe)  # as setup() uses it: on --resume, the run's own recipe
    check_data_file(run_recipe.data)
    records = read_training_records(run_recipe.data, run_recipe.train.method)  # once: setup trains on these
    limit = known_context(run_recipe.model)
    if limit:
        check_context(run_recipe, limit)
    check_lora_variant(run_recipe.lora, run_recipe.model, vllm=run_recipe.train.samples_with_vllm)
    if run_recipe.model.adapter:
        check_adapter_fits(run_recipe.model.adapter, run_recipe.lora, run_recipe.model)
    if not measuring:
        check_trackers(run_recipe)
    return Checked(recipe, resume, force, plan, records, limit)


def known_context(model: ModelConfig) -> int | None:
    """``max_position_embeddings`` from a config on disk (the embedded model, a local directory) or the published
    config of a Hub id (family.PUBLISHED); None when only transformers and the Hub could say."""
    if model.name_or_path == EMBEDDED_MODEL:
        from qlora_phi3.model.tiny import TINY_MODEL_DIR

        path = TINY_MODEL_DIR / "config.json"
    else:
        path = Path(model.name_or_path).expanduser() / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return None  # an unreadable config is reported where transformers reads it
    known = published(model.name_or_path)
    return known.config.get("max_position_embeddings") if known else None


def check_context(recipe: Recipe, limit: int | None) -> None:
    if limit and recipe.data.max_seq_len > limit:
        raise UserError(f"data.max_seq_len={recipe.data.max_seq_len} exceeds the model's context of {limit} "
                        f"tokens ({recipe.model.name_or_path}); lower it or use a long-context model "
                        "(microsoft/Phi-3-mini-128k-instruct).")


def trackers(recipe: Recipe) -> list[str]:
    """The trackers a run reports to ('none' dropped)."""
    return [name for name in dict.fromkeys(recipe.train.report_to) if name != "none"]


def check_trackers(recipe: Recipe) -> None:
    """Every requested tracker is installed; else one error naming the extra (``find_spec``: nothing imported)."""
    missing = [name for name in trackers(recipe) if importlib.util.find_spec(_NEEDS[name][0]) is None]
    if missing:
        extras = ",".join(_NEEDS[name][1] for name in missing)
        raise UserError(f"train.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                        f"install with `pip install 'qlora-phi3[{extras}]'` or drop "
                        f"{'it' if len(missing) == 1 else 'them'} from train.report_to.")
