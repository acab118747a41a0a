"""The checks ``train`` makes in about a second, before torch and transformers load (tens of seconds on a small CPU).

A mistake in a file or a directory used to be answered after the heavy imports, 30 s after a key typo would
have been. :func:`preflight` runs, with no heavy import, the checks that need none: the recipe's values (already
checked by ``load_recipe``), the run directory (:func:`qlora_phi3.run.rundir.prepare_run_dir`), the data file's
whole-file checks (:func:`qlora_phi3.data.read.check_data_file`; for SFT, a local file up to 64 MiB also record by
record, :func:`qlora_phi3.data.read.load_records`, so a file with no usable conversation or too many bad ones is
refused too) and ``data.max_seq_len`` against the model's context when its ``config.json`` is on disk or published. :func:`qlora_phi3.run.train.setup` makes the same checks
again for callers of the library, with the same functions, so the messages are the same either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_phi3.config import EMBEDDED_MODEL, ModelConfig, Recipe, with_absolute_paths
from qlora_phi3.data.read import check_data_file, load_records, resolve_data_path
from qlora_phi3.errors import UserError
from qlora_phi3.family import published
from qlora_phi3.run.rundir import prepare_run_dir

__all__ = ["check_context", "known_context", "preflight"]

READ_TWICE_BYTES = 64 * 2**20  # chat files up to this size are also checked record by record before torch loads


def preflight(recipe: Recipe, resume: bool = False, force: bool = False) -> None:
    """Refuse, with the same one-line messages as :func:`qlora_phi3.run.train.setup`, what can be known wrong
    without loading torch: the run directory, the data file, the context length. Writes nothing."""
    plan = prepare_run_dir(recipe, resume, force)
    recipe = with_absolute_paths(plan.recipe)  # as setup() does: on --resume, the run's own recipe with the changes
    check_data_file(recipe.data)
    if recipe.train.method == "sft" and _small_local_file(recipe.data.path):
        load_records(recipe.data)  # record by record: data with no usable conversation is refused now too
    limit = known_context(recipe.model)
    if limit:
        check_context(recipe, limit)


def _small_local_file(path: str) -> bool:
    """A local file small enough to read twice (here, and when training loads it) without anyone noticing."""
    local = Path(resolve_data_path(path)).expanduser()
    return local.is_file() and local.stat().st_size <= READ_TWICE_BYTES


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
