"""Finding what a path holds (a run, an adapter or a merged model), which base model an adapter belongs
to, and loading the adapter onto a base with every key accounted for.

Shared by ``merge`` and ``chat``: both accept a run directory, an adapter directory, and (chat only) a
merged model directory, and both must refuse an adapter whose base does not match before loading weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from peft import PeftModel
from safetensors import safe_open

from qlora_phi3.config import ModelConfig, Recipe, load_recipe
from qlora_phi3.errors import UserError
from qlora_phi3.model.load import read_model_config
from qlora_phi3.model.generate import stop_token_ids  # re-exported: merge and export stop on the same ids
from qlora_phi3.run.record import ADAPTER_META, BASE_SHAPE_KEYS, RECIPE_FILE, RUN_FILE
from qlora_phi3.ui import warn

__all__ = ["Source", "check_base", "load_adapter", "resolve_source", "stop_token_ids"]


@dataclass
class Source:
    """What a user-given directory holds.

    kind: "run" (a training output dir), "adapter" (PEFT adapter dir) or "merged" (a standalone model).
    model_cfg: the base model and its 4-bit settings as trained (None for a merged model).
    base_config: the base model's shapes recorded at training time ({} if the adapter did not record them).
    recipe: the run's resolved recipe when known (to rebuild its eval split).
    compute_dtype: the compute dtype training used (None if unknown).
    run: the run's run.json (its eval split fingerprint, ...), when known.
    """
    kind: str
    path: Path
    adapter_dir: Path | None = None
    model_cfg: ModelConfig | None = None
    base_config: dict | None = None
    recipe: Recipe | None = None
    compute_dtype: str | None = None
    max_seq_len: int = 1024
    run: dict | None = None  # the run's run.json, when the adapter came out of a run directory


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}).") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); the directory is damaged, re-run training "
                        "or point at another adapter.") from None


def _is_merged_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) \
        and not (path / "adapter_config.json").is_file()


def _run_recipe(run_dir: Path) -> Recipe | None:
    """The run's resolved recipe (recipe.yaml next to run.json), or None if it cannot be read."""
    if not (run_dir / RECIPE_FILE).is_file():
        return None
    try:
        return load_recipe(run_dir / RECIPE_FILE, [])
    except UserError as e:
        warn(f"{run_dir / RECIPE_FILE} could not be read ({e}); using defaults for the 4-bit settings.")
        return None


def resolve_source(path: str | Path, base: str | None = None, revision: str | None = None) -> Source:
    """Classify ``path`` and work out its base model.

    Args:
        path: a run directory (holds run.json and adapter/), an adapter directory (adapter_config.json)
            or a merged model directory (config.json and *.safetensors, no adapter).
        base: use this base model (Hub id or local dir) instead of the one the adapter names.
        revision: use this base revision instead of the one the adapter names.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or directory; give a run directory (train.output_dir), "
                        "its adapter/ directory, or a merged model directory.")
    if not p.is_dir():
        raise UserError(f"{path}: is a file; give a run directory, an adapter directory or a merged model directory.")
    if (p / RUN_FILE).is_file() and not (p / "adapter_config.json").is_file():
        run = _read_json(p / RUN_FILE)
        if not (p / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"{path}: this run has no finished adapter yet (run status: "
                            f"{run.get('status', 'unknown')}); let training finish, or point at one of its "
                            "checkpoint-N directories.")
        src = _adapter_source(p / "adapter", p, base, revision)
        return replace(src, kind="run", path=p)
    if (p / "adapter_config.json").is_file():
        run_dir = p.parent if (p.parent / RUN_FILE).is_file() else None
        return _adapter_source(p, run_dir, base, revision)
    if _is_merged_model(p):
        return Source("merged", p)
    raise UserError(f"{path}: neither a run directory (run.json + adapter/), an adapter directory "
                    "(adapter_config.json) nor a model directory (config.json + *.safetensors).")


def _adapter_source(adapter_dir: Path, run_dir: Path | None, base: str | None, revision: str | None) -> Source:
    recipe = _run_recipe(run_dir) if run_dir else None
    run = _read_json(run_dir / RUN_FILE) if run_dir and (run_dir / RUN_FILE).is_file() else {}
    if (adapter_dir / ADAPTER_META).is_file():
        meta = _read_json(adapter_dir / ADAPTER_META)
        name, rev, shapes = meta.get("base_model"), meta.get("revision"), meta.get("base_config") or {}
        max_seq_len = meta.get("max_seq_len") or 1024
    elif recipe is not None:  # a checkpoint-N directory: the run's recipe names the base
        name, rev, shapes, max_seq_len = recipe.model.name_or_path, recipe.model.revision, {}, recipe.data.max_seq_len
    else:  # a plain PEFT adapter from elsewhere: only PEFT's record of the base is available
        peft_cfg = _read_json(adapter_dir / "adapter_config.json")
        name, rev, shapes, max_seq_len = peft_cfg.get("base_model_name_or_path"), peft_cfg.get("revision"), {}, 1024
        warn(f"{adapter_dir} has no {ADAPTER_META} (not written by qlora-phi3 train): the base model's shapes "
             "cannot be checked before loading.")
    if not name and not base:
        raise UserError(f"{adapter_dir}: the adapter does not say which base model it was trained on; "
                        "pass --base NAME_OR_PATH.")
    if revision and rev and revision != rev:
        raise UserError(f"--revision {revision} does not match the revision the adapter was trained on ({rev}, "
                        f"recorded in {adapter_dir / ADAPTER_META}); a LoRA update only fits the weights it was "
                        "trained against. Drop --revision.")
    if base and revision is None and rev and Path(base).expanduser().is_dir():
        _check_snapshot_revision(Path(base).expanduser(), rev, adapter_dir)
    model_cfg = replace(recipe.model) if recipe is not None else ModelConfig()
    model_cfg.name_or_path = base or name
    model_cfg.revision = revision or rev
    if base and base != name:
        warn(f"--base {base}: the adapter was trained on {name}; its identity is checked by shapes and "
             "revision only.")
    return Source("adapter", adapter_dir, adapter_dir, model_cfg, shapes, recipe,
                  run.get("compute_dtype"), max_seq_len, run or None)


def _check_snapshot_revision(base_dir: Path, rev: str, adapter_dir: Path) -> None:
    """A Hub cache snapshot directory is named after its commit: if it differs from the adapter's pinned
    revision, the weights are not the ones the adapter was trained on."""
    snapshot = base_dir.resolve().name
    if base_dir.resolve().parent.name == "snapshots" and len(snapshot) == 40 and snapshot != rev:
        raise UserError(f"--base {base_dir} is the Hub snapshot of commit {snapshot}, but the adapter was trained "
                        f"on revision {rev} ({adapter_dir / ADAPTER_META}); download that revision "
                        f"(`hf download ... --revision {rev}`) and point --base at it.")


def check_base(src: Source):
    """Read the base model's config.json (no weights) and refuse it if its shapes differ from those the
    adapter was trained on. Returns the base config."""
    config = read_model_config(src.model_cfg)
    if not src.base_config:
        return config
    wrong = [f"{k}: adapter {src.base_config[k]!r}, base {getattr(config, k, None)!r}"
             for k in BASE_SHAPE_KEYS if k in src.base_config and src.base_config[k] != getattr(config, k, None)]
    if wrong:
        raise UserError(f"{src.adapter_dir} was trained on a different base than {src.model_cfg.name_or_path}"
                        f"{' @ ' + src.model_cfg.revision if src.model_cfg.revision else ''} ("
                        + "; ".join(wrong) + "). Merge it into the model it was trained on "
                        "(see base_model in qlora_phi3.json), or pass that model with --base.")
    return config


def load_adapter(base_model, adapter_dir: Path):
    """``PeftModel.from_pretrained`` for inference, refusing an adapter with missing or misshapen weights
    (PEFT only warns about missing keys, which would silently drop part of the fine-tune)."""
    try:
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{adapter_dir}: the adapter does not fit the base model ({str(e).splitlines()[0]}); "
                        "it was trained on a different model.") from None
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors (qlora-phi3 loads safetensors only).")
    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    # PEFT saves a DoRA magnitude as '...lora_magnitude_vector' (the parameter is '...lora_magnitude_vector.default.weight')
    expected = {n.replace(".default.", ".").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                for n, _ in model.named_parameters() if "lora_" in n}
    missing = sorted(expected - saved)
    if missing:
        raise UserError(f"{weights}: {len(missing)} of {len(expected)} LoRA weights are missing (e.g. {missing[0]}); "
                        "the adapter file is incomplete or from a different configuration.")
    return model.eval()
