"""What ``qlora-phi3 eval TARGET`` evaluates, and each model of it loaded in turn, base first.

* a run directory (or an adapter directory): the base and the fine-tune. By default on the model as trained, one
  4-bit base with the adapter loaded once: the base is that model inside PEFT's ``disable_adapter()``, the fine-tune
  the same weights with it on, so the two differ by the adapter alone. ``--merged``: the 16-bit base, then the
  adapter merged into it (PEFT ``merge_and_unload``), what ``qlora-phi3 merge`` writes.
* a merged model directory or a base model (Hub id or local directory): that model, in the dtype it was saved in;
  ``--base NAME_OR_PATH`` evaluates another model first and compares the two.

:func:`resolve_target` reads no weights (it refuses a run without an adapter); :func:`each_model` loads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_phi3.config import EMBEDDED_MODEL, ModelConfig, Recipe
from qlora_phi3.errors import UserError

if TYPE_CHECKING:  # out.artifacts imports PEFT: only once a run is evaluated, so model targets' checks stay quick
    from qlora_phi3.ship.artifacts import Source

__all__ = ["Evaluated", "Target", "each_adapter_state", "each_model", "resolve_target", "run_tokenizer"]


@dataclass
class Target:
    text: str  # as the user wrote it
    kind: str  # "run" (a run or adapter directory: base and fine-tune) or "model" (one model)
    source: Source | None = None  # for a run
    model_cfg: ModelConfig | None = None  # the model itself, for kind "model"
    base_cfg: ModelConfig | None = None  # --base, for kind "model"
    merged: bool = False

    @property
    def run_dir(self) -> Path | None:
        """The run directory whose run.json gets the summary (None for an adapter outside a run, or a model)."""
        if self.source is None or self.source.run is None:
            return None
        return self.source.path if self.source.kind == "run" else self.source.adapter_dir.parent

    @property
    def recipe(self) -> Recipe | None:
        return self.source.recipe if self.source is not None else None


@dataclass
class Evaluated:
    """One model, in the state to evaluate it in while the caller holds it (the iteration step of each_model)."""
    label: str  # "base", "finetune" or "model"
    model: object
    tokenizer: object
    description: str


def resolve_target(text: str, merged: bool = False, base: str | None = None) -> Target:
    """Classify TARGET without loading weights: refuses a run directory without a finished adapter, a model
    directory without weights, and flags that do not fit the target."""
    p = Path(text).expanduser()
    is_model_id = not p.exists() and (text == EMBEDDED_MODEL or text.count("/") == 1)
    if is_model_id or (p.is_dir() and not (p / "run.json").is_file() and not (p / "adapter_config.json").is_file()):
        if merged:
            raise UserError(f"--merged: {text} is one model, not a run; --merged evaluates a run's adapter merged "
                            "into its 16-bit base. Drop it.")
        if is_model_id:
            from qlora_phi3.hub import ensure_hub_access

            ensure_hub_access(text, None, "TARGET")
        elif not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
            raise UserError(f"{text}: neither a run directory (run.json + adapter/), an adapter directory nor a model "
                            "directory (config.json + *.safetensors).")
        if base:
            from qlora_phi3.hub import ensure_hub_access

            ensure_hub_access(base, None, "--base")
        return Target(text, "model", model_cfg=ModelConfig(name_or_path=text),
                      base_cfg=ModelConfig(name_or_path=base) if base else None)
    if base:
        raise UserError(f"--base: {text} is a run; its base is the model it was trained on, evaluated with the adapter "
                        "off. Drop --base.")
    from qlora_phi3.ship.artifacts import check_base, resolve_source

    source = resolve_source(text)  # refuses a run without a finished adapter, in one line
    if source.kind == "merged":
        return Target(text, "model", model_cfg=ModelConfig(name_or_path=str(source.path)))
    check_base(source)  # the base's config against the adapter's recorded shapes, before any weight loads
    return Target(text, "run", source=source, merged=merged)


def _sixteen_bit(cfg: ModelConfig, device: str, attn: str, dtype: str):
    """A whole model in 16 bits (or as saved: dtype "auto"), safetensors only, no KV cache in its forward."""
    from transformers import AutoModelForCausalLM

    from qlora_phi3.model.load import auto_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.name_or_path)
    try:
        tokenizer = auto_tokenizer(path, revision=cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(path, revision=cfg.revision, dtype=dtype, device_map={"": device},
                                                     attn_implementation=attn, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.name_or_path}: cannot load the model ({str(e).splitlines()[0]}).") from None
    return model.eval(), tokenizer


def run_tokenizer(src: Source):
    """The tokenizer saved beside the adapter (the run's chat template), else the base model's."""
    from qlora_phi3.model.load import load_tokenizer

    has_tokenizer = (src.adapter_dir / "tokenizer_config.json").is_file()
    return load_tokenizer(src.model_cfg, str(src.adapter_dir) if has_tokenizer else None)


def each_model(target: Target, device: str, compute_dtype: str) -> Iterator[Evaluated]:
    """Each model of ``target``, base first, loaded once; the adapter is off while the caller holds the base."""
    from qlora_phi3.model.load import hide_load_progress_bars, load_model, pick_attention

    hide_load_progress_bars()
    attn = pick_attention("auto", device).value
    if target.kind == "model":
        if target.base_cfg is not None:
            model, tokenizer = _sixteen_bit(target.base_cfg, device, attn, "auto")
            yield Evaluated("base", model, tokenizer, f"{target.base_cfg.name_or_path} ({model.dtype})")
            del model
        model, tokenizer = _sixteen_bit(target.model_cfg, device, attn, "auto")
        label = "finetune" if target.base_cfg is not None else "model"
        yield Evaluated(label, model, tokenizer, f"{target.model_cfg.name_or_path} ({model.dtype})")
        return
    from qlora_phi3.ship.artifacts import load_adapter

    src = target.source
    tokenizer = run_tokenizer(src)
    if target.merged:
        base, _ = _sixteen_bit(src.model_cfg, device, attn, "float16")
        yield Evaluated("base", base, tokenizer, f"{src.model_cfg.name_or_path} in float16")
        merged = load_adapter(base, src.adapter_dir).merge_and_unload()
        yield Evaluated("finetune", merged.eval(), tokenizer, f"adapter {src.adapter_dir} merged into it (float16)")
        return
    model = load_adapter(load_model(src.model_cfg, device, compute_dtype, attn), src.adapter_dir)
    yield from each_adapter_state(model, tokenizer, f"4-bit {src.model_cfg.name_or_path}", str(src.adapter_dir))


def each_adapter_state(peft_model, tokenizer, base_name: str, adapter: str) -> Iterator[Evaluated]:
    """One PEFT model as base (inside ``disable_adapter()``) and as fine-tune: the same weights in memory."""
    peft_model.eval()
    with peft_model.disable_adapter():
        yield Evaluated("base", peft_model, tokenizer, f"{base_name}, adapter off")
    yield Evaluated("finetune", peft_model, tokenizer, f"{base_name} + adapter {adapter} (as trained)")
