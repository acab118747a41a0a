"""The recipe: one typed schema for everything a run needs, loaded from YAML plus ``key=value`` overrides.

Precedence: dataclass defaults < recipe file < command-line ``section.key=value``. Unknown keys and
wrong types are errors that name the key, the file:line, and the closest valid key. The resolved
recipe is written next to every output (``recipe.yaml``) so a run can always be reproduced.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from qlora_phi3.errors import UserError
from qlora_phi3.key_map import TRANSLATIONS, our_key, recognise
from qlora_phi3.methods import DEFAULT_METHOD, METHODS
from qlora_phi3.phi3 import PHI3_TARGETS

__all__ = [
    "DataConfig", "LoraSettings", "ModelConfig", "Recipe", "TrainConfig", "EMBEDDED_DATA", "EMBEDDED_MODEL",
    "DEFAULT_RECIPE", "TRACKERS", "load_recipe", "recipes_dir", "resolve_recipe", "shipped_recipes", "recipe_to_dict", "dump_recipe", "field_help", "with_absolute_paths",
]

EMBEDDED_MODEL = "embedded:tiny-phi3"
EMBEDDED_DATA = "embedded:tiny-chat"
DEFAULT_RECIPE = "tiny_cpu"
# train.report_to: transformers' own integrations we support and test ("none" = no tracker).
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
# train.method's allowed values: the methods table's keys (qlora_phi3/methods.py)
MethodName = Literal[tuple(METHODS)]


def recipes_dir() -> Path:
    """The shipped recipes: the top-level ``recipes/`` folder, installed as the package data
    ``qlora_phi3.recipes`` (pyproject.toml maps it), so an installed qlora-phi3 finds them anywhere."""
    # find_spec, not importlib.resources.files: recipes/ has no __init__.py, so the installed folder is a namespace
    # package, and files() hands back a MultiplexedPath whose str() is not a path.
    import importlib.util

    spec = importlib.util.find_spec("qlora_phi3.recipes")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "recipes"  # a source checkout on sys.path without an install


def shipped_recipes() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped recipe."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file given as a path, or a shipped recipe given by name ('phi3_mini_4k_12gb', with or
    without '.yaml')."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in shipped and str(path.parent) in (".", "recipes"):
        return shipped[stem]
    if path.is_dir():
        raise UserError(f"{name_or_path} is a directory, not a recipe file; to continue a run in it use "
                        f"`qlora-phi3 train --resume {name_or_path}`.")
    close = difflib.get_close_matches(stem, list(shipped), n=1, cutoff=0.6)
    hint = f"Did you mean {close[0]}? " if close else ""
    raise UserError(f"recipe file not found: {name_or_path}. {hint}Give a YAML file or a shipped recipe's name: "
                    f"{', '.join(shipped)} (`qlora-phi3 recipes` describes them).")


def _f(default, doc: str, **kw):
    """A dataclass field whose help text lives next to it (shown by ``--help`` and in errors)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": doc}, **kw)
    return field(default=default, metadata={"help": doc}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _f(EMBEDDED_MODEL, "Hub id or local directory of a Phi-3 model; "
                           f"'{EMBEDDED_MODEL}' is the tiny offline model shipped with qlora-phi3.")
    revision: str | None = _f(None, "Hub commit to pin (config fields changed between Phi-3 revisions).")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = _f(
        "auto", "auto = flash_attention_2 when flash-attn is installed and the GPU is Ampere+, else sdpa.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "auto = bfloat16 where native (Ampere+ GPUs; CPUs with AVX512-BF16, AMX or ARM BF16), float16 with "
        "loss scaling on older GPUs, float32 on other CPUs (emulated bf16 is ~10x slower).")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type of the frozen base weights.")
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves ~0.37 bit/weight).")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = _f(
        "uint8", "Storage dtype of packed 4-bit weights; FSDP needs it equal to the compute dtype.")
    trust_remote_code: bool = _f(False, "Run Python code from the model repository (off: native Phi3ForCausalLM).")
    adapter: str | None = _f(
        None, "Start from a trained adapter: a run directory (its adapter/) or an adapter directory, e.g. an SFT run "
              "before DPO. Training continues that adapter; for dpo and kto a frozen copy of it is the reference "
              "policy (TRL's 'ref' adapter on the same 4-bit base, no second model). null = a fresh adapter.")


@dataclass
class LoraSettings:
    r: int = _f(16, "LoRA rank. Memory cost is small (~100 MB at r=16 on Phi-3-mini); quality rises then plateaus.")
    alpha: int = _f(32, "LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = _f(list(PHI3_TARGETS), "Module names to adapt. Phi-3 fuses q/k/v into qkv_proj and "
                                                 "gate/up into gate_up_proj.")
    # LoRA variants, all PEFT's own (peft.LoraConfig); README "LoRA variants" says when to use which.
    use_rslora: bool = _f(False, "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so high ranks "
                                 "keep learning (arXiv 2312.03732).")
    use_dora: bool = _f(False, "DoRA: learn a magnitude vector per output feature beside the LoRA direction "
                               "(arXiv 2402.09353); often better at low rank, slower steps and more memory.")
    init: Literal["gaussian", "default", "olora", "pissa", "loftq"] = _f(
        "gaussian", "LoRA initialisation: gaussian (A Gaussian with std 1/r, B zero: starts as the base model); "
                    "default (PEFT's own: A Kaiming-uniform, B zero); olora (QR of the "
                    "base weight, which is re-quantized without that part); loftq (A, B fitted to the 4-bit "
                    "quantization error, from the 16-bit weights on disk). pissa needs a 16-bit base and is refused "
                    "on the 4-bit one.")


@dataclass
class DataConfig:
    path: str = _f(EMBEDDED_DATA, "Local JSONL file, or a Hugging Face dataset id; "
                   f"'{EMBEDDED_DATA}' is the bundled synthetic chat set.")
    split: str = _f("train", "Dataset split to train on (Hub datasets).")
    revision: str | None = _f(None, "Dataset revision to pin (Hub datasets).")
    eval_split: str | None = _f(None, "Split to evaluate on; unset = hold out eval_fraction of the training data.")
    eval_fraction: float = _f(0.05, "Share of samples held out for eval when there is no eval_split.")
    max_eval_samples: int = _f(200, "Cap on eval samples, so evaluation stays a small share of the run.")
    max_seq_len: int = _f(1024, "Tokens per sample; longer samples are truncated (and counted). "
                                "Activation memory grows linearly with it.")
    max_samples: int | None = _f(None, "Use only the first N training samples (quick experiments).")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = _f(
        "auto", "Record format; auto detects it from the first valid record's fields.")
    strict: bool = _f(False, "Fail on the first bad record instead of skipping it.")
    max_bad_fraction: float = _f(0.1, "Fail if more than this share of records is bad (skipped).")
    drop_duplicates: bool = _f(True, "Skip exact duplicate conversations (each is reported with the file:line "
                                     "of its first copy either way).")
    max_prompt_len: int | None = _f(
        None, "Preference methods: prompts longer than this many tokens keep their last max_prompt_len tokens (the "
              "latest turns); then answers are cut so prompt + answer fit data.max_seq_len. null = no prompt limit.")
    packing: bool = _f(True, "Pack samples into rows of max_seq_len without padding, with no attention across "
                             "samples (the fast default for chat data); false pads each micro-batch to its longest. "
                             "SFT only: preference pairs are never packed (each answer is scored on its own row).")
    group_by_length: bool = _f(True, "data.packing=false only: draw each optimizer step's conversations from a "
                                     "group of similar length (transformers' length-grouped sampler: random "
                                     "mega-batches, each sorted by length), so less of every micro-batch is padding; "
                                     "false = uniformly random micro-batches.")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/tiny", "Run directory: checkpoints, adapter/, run.json, recipe.yaml.")
    method: MethodName = _f(
        DEFAULT_METHOD, "Training method. sft: supervised on chats. dpo: preference pairs against a frozen reference (the 4-bit "
               "base with the adapter off, or model.adapter's frozen copy; TRL DPOTrainer). orpo: pairs in one pass, "
               "no reference (SFT loss + odds-ratio term; TRL ORPOTrainer). kto: unpaired answers labelled "
               "good/bad (TRL KTOTrainer). simpo: pairs, no reference, length-normalised reward with a margin "
               "(TRL CPOTrainer, loss_type=simpo). grpo: prompts, completions sampled and scored by train.rewards "
               "(TRL GRPOTrainer; docs/grpo.md). docs/preference.md has the data formats.")
    beta: float | None = _f(
        None, "Preference methods' beta. dpo/kto: how strongly the policy is held to the reference (higher = closer; "
              "default 0.1). orpo: weight lambda of the odds-ratio term (default 0.1). simpo: reward scale (default "
              "2.0, the SimPO paper's range 2-2.5). grpo: KL weight to the reference (default 0: no KL term and no "
              "reference forward; DeepSeek-R1 used 0.04). null = the method's default.")
    dpo_loss: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero"] = _f(
        "sigmoid", "dpo only: TRL's DPO loss type. sigmoid = the DPO paper; ipo = IPO (beta is its tau); hinge = SLiC; "
                   "robust = noisy-label DPO; sigmoid_norm = length-normalised DPO; apo_zero = APO.")
    simpo_gamma: float = _f(0.5, "simpo only: target reward margin gamma (paper: gamma / beta around 0.5).")
    kto_desirable_weight: float = _f(1.0, "kto only: loss weight of desirable (label true) answers; raise it when they "
                                          "are rarer than undesirable ones (KTO paper: weight x count ratio in 1-1.33).")
    kto_undesirable_weight: float = _f(1.0, "kto only: loss weight of undesirable (label false) answers.")
    precompute_ref_log_probs: bool = _f(
        False, "dpo/kto: score every pair under the reference once before training (one no-grad pass over the data) "
               "instead of a reference forward per step: each step then skips that forward (~1/3 less compute per "
               "step) and its activations.")
    # GRPO (train.method=grpo): the batch sizes above count completions, as in TRL.
    rewards: list[str] = _f([], "grpo only: reward functions, each a built-in (think_format, exact_answer, "
                                "numeric_answer), package.module:function or path/to/file.py:function in TRL's "
                                "signature (prompts, completions, completion_ids, **columns) -> list[float | None].")
    reward_weights: list[float] | None = _f(None, "grpo only: one weight per train.rewards entry; null = all 1.")
    answer_column: str = _f("answer", "grpo only: the data column exact_answer and numeric_answer compare with.")
    numeric_tolerance: float = _f(1e-6, "grpo only: the numeric_answer reward's tolerance (relative, and absolute "
                                        "near zero).")
    num_generations: int = _f(8, "grpo only: completions sampled per prompt (the group whose mean reward is the "
                                 "baseline). micro_batch_size x grad_accum must be a multiple of it.")
    max_completion_len: int = _f(256, "grpo only: tokens per sampled completion (longer ones are cut and counted as "
                                      "truncated). Generation memory grows with group size x (prompt + this).")
    temperature: float = _f(1.0, "grpo only: sampling temperature of the completions.")
    top_p: float = _f(1.0, "grpo only: nucleus sampling of the completions (1.0 = off).")
    generator: Literal["transformers", "vllm"] = _f(
        "transformers", "grpo only: what samples the completions. transformers: generate on the training model, "
                        "adapter active (any device). vllm: a vLLM engine on the same GPU, fed the adapter as a LoRA "
                        "after every step, never merged into the 4-bit base; needs a CUDA GPU and "
                        "pip install 'trl[vllm]'; not tested on a GPU here (docs/grpo.md).")
    vllm_gib: float = _f(6.0, "grpo with train.generator=vllm: GPU memory vLLM may take while it samples (its own "
                              "4-bit copy of the base, CUDA graphs, the KV cache); during each training step it "
                              "sleeps, its weights offloaded to CPU memory.")
    max_steps: int = _f(-1, "Optimizer steps; -1 = run train.epochs epochs.")
    epochs: float = _f(1.0, "Passes over the training data when max_steps is -1.")
    micro_batch_size: int = _f(1, "Samples per forward pass. Activation memory grows linearly with it.")
    grad_accum: int = _f(8, "Micro-batches per optimizer step: a bigger effective batch at no memory cost.")
    lr: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f("cosine", "LR schedule.")
    warmup_ratio: float = _f(0.03, "Share of steps spent warming the LR up.")
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = _f(0.3, "Gradient clipping (QLoRA paper value).")
    optimizer: Literal["paged_adamw_8bit", "adamw_torch", "adamw_8bit", "paged_adamw_32bit"] = _f(
        "paged_adamw_8bit", "8-bit states cost 2 bytes/param vs 8 for 32-bit AdamW; paged ones spill to CPU "
                            "instead of OOM on spikes.")
    gradient_checkpointing: bool | Literal["offload"] = _f(
        True, "Recompute activations in backward: saves several GB at 2k tokens for ~30% more compute; "
              "'offload' also keeps the saved layer inputs in pinned CPU memory.")
    loss_chunk_tokens: int = _f(
        256, "Labelled positions whose logits are built at once by the chunked cross-entropy "
             "(256 x 32064 vocab ~ 82 MB); 0 = the trainer's own head: TRL's tiled log-prob head (up to 4096 "
             "positions x 32768 columns, ~3.7 GiB with its metrics) for sft, dpo, kto and grpo, the full logits "
             "for orpo and simpo.")
    tile_tokens: int = _f(
        0, "Sequence tiling: each decoder layer's norms, projections and MLP (with LoRA) run over chunks of this "
           "many tokens, in forward and in the checkpoint recompute, so one layer's working set scales with the "
           "chunk, not the sequence (long context; qlora_phi3/run/tiling.py). Costs one more forward of those parts "
           "per step. 0 = off; the long-context recipes use 4096.")
    seed: int = _f(42, "Seed for init, data order and dropout.")
    logging_steps: int = _f(10, "Steps between log lines.")
    eval_steps: int = _f(50, "Steps between evaluations (0 = only at start and end).")
    save_steps: int = _f(100, "Steps between checkpoints (0 = none).")
    save_total_limit: int = _f(2, "Checkpoints kept; older ones are deleted.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available, else cpu.")
    neftune_noise_alpha: float | None = _f(
        None, "NEFTune: uniform noise of this scale on the input embeddings while training (TRL/transformers; "
              "arXiv 2310.05914; 5 is the paper's value). null = off.")
    report_to: list[str] = _f([], "Experiment trackers that get the metrics: tensorboard (files in "
                                  "<output_dir>/tensorboard), wandb (offline unless WANDB_MODE is set), mlflow "
                                  "(<output_dir>/mlruns unless MLFLOW_TRACKING_URI is set). Empty or none = none.")
    run_name: str | None = _f(None, "Run name shown by the trackers; null = the output directory's name.")
    sample_prompts: int | str = _f(
        3, "Sample answers at every evaluation: a number N (the first N held-out eval conversations) or a file of "
           "prompts (.txt: one per line; .jsonl: a 'prompt' string or 'messages' per line). 0 = off.")
    sample_max_new_tokens: int = _f(64, "Cap on each sample answer's length (greedy; bounds the time samples take).")
    eval_tasks: list[str] = _f([], "lm-evaluation-harness tasks to score the base (adapter off) and the fine-tune on "
                                   "when training ends, as `qlora-phi3 eval RUN --tasks ...` does; the table joins the "
                                   "final summary and run.json. Checked before training starts. e.g. [tiny_chat_facts]; "
                                   "empty = none (needs pip install 'qlora-phi3[eval]').")
    eval_include_path: str | None = _f(None, "Folder of your own lm-eval task YAMLs for train.eval_tasks "
                                             "(the shipped tiny_chat_facts is always found).")
    eval_limit: int | None = _f(None, "train.eval_tasks on only the first N documents of each task (a quick look); "
                                      "null = all of them.")

    @property
    def samples_with_vllm(self) -> bool:
        """A method that samples its own completions (grpo), sampling them with vLLM (train.generator=vllm)."""
        return self.generator == "vllm" and METHODS[self.method].generates


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})


SECTIONS = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig, "train": TrainConfig}


def field_help() -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every recipe field, for ``--help`` and docs."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((f"{section}.{f.name}", f.metadata.get("help", ""), default))
    return rows


def _all_keys() -> list[str]:
    return [key for key, _, _ in field_help()]


def _suggest(key: str, candidates: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if our_key(leaf) in candidates:  # another tool's name for one of our keys (key_map.py)
        return f" (did you mean '{our_key(leaf)}'?)"
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close and "." in key:  # 'lora.rank' -> compare the leaf too
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]], cutoff=0.6)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, str(tp))


_NO = object()


def _coerce(value: Any, tp) -> Any:
    """``value`` as type ``tp``, or ``_NO``. Strings from the command line are parsed by the schema's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        for c in choices:  # `gradient_checkpointing=true` arrives as the string 'true'
            if isinstance(value, str) and str(c).lower() == value.lower():
                return c
        return _NO
    if origin is Union or type(tp).__name__ == "UnionType":
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None if type(None) in args else _NO
        for a in args:
            if a is type(None):
                continue
            out = _coerce(value, a)
            if out is not _NO:
                return out
        return _NO
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            return _NO
        items = [_coerce(v, inner) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        return _NO
    if tp is int:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                return _NO
        return _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '2e-4' as a string
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        return _NO
    raise TypeError(f"unsupported schema type {tp}")  # a bug in the schema, not user input


def _yaml_lines(text: str) -> dict[str, int]:
    """1-based line of every dotted key in a YAML document, for file:line messages."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def _set_field(recipe: Recipe, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"{where}: unknown key '{key}'{_suggest(key, _all_keys())}. "
                        f"Keys look like section.name with sections {', '.join(SECTIONS)}.")
    section, name = parts
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise UserError(f"{where}: unknown key '{key}'{_suggest(key, _all_keys())}.")
    out = _coerce(value, hints[name])
    if out is _NO:
        raise UserError(f"{where}: '{key}' must be {_type_name(hints[name])}, got {value!r}.")
    setattr(getattr(recipe, section), name, out)


def _parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value (e.g. lora.r=32 train.max_steps=10).")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _check_values(recipe: Recipe, origins: dict[str, str], source: str) -> None:
    """Values that have the right type but cannot work; checked before any model is loaded."""

    def where(key):
        return origins.get(key, f"{source} (default value)")

    checks = [
        ("lora.r", recipe.lora.r >= 1, "must be at least 1"),
        ("lora.alpha", recipe.lora.alpha >= 1, "must be at least 1"),
        ("lora.dropout", 0.0 <= recipe.lora.dropout < 1.0, "must be in [0, 1)"),
        ("lora.target_modules", len(recipe.lora.target_modules) > 0, "must name at least one module"),
        ("data.max_seq_len", recipe.data.max_seq_len >= 16, "must be at least 16 tokens"),
        ("data.eval_fraction", 0.0 <= recipe.data.eval_fraction < 1.0, "must be in [0, 1)"),
        ("data.max_eval_samples", recipe.data.max_eval_samples >= 1, "must be at least 1"),
        ("data.max_samples", recipe.data.max_samples is None or recipe.data.max_samples >= 1, "must be at least 1"),
        ("data.max_prompt_len", recipe.data.max_prompt_len is None or 1 <= recipe.data.max_prompt_len
         < recipe.data.max_seq_len, "must be at least 1 and below data.max_seq_len (or null)"),
        ("data.max_bad_fraction", 0.0 <= recipe.data.max_bad_fraction <= 1.0, "must be in [0, 1]"),
        ("train.max_steps", recipe.train.max_steps == -1 or recipe.train.max_steps >= 1,
         "must be -1 (use train.epochs) or at least 1"),
        ("train.epochs", recipe.train.epochs > 0, "must be positive"),
        ("train.micro_batch_size", recipe.train.micro_batch_size >= 1, "must be at least 1"),
        ("train.grad_accum", recipe.train.grad_accum >= 1, "must be at least 1"),
        ("train.lr", recipe.train.lr > 0, "must be positive"),
        ("train.warmup_ratio", 0.0 <= recipe.train.warmup_ratio < 1.0, "must be in [0, 1)"),
        ("train.weight_decay", recipe.train.weight_decay >= 0, "must be non-negative"),
        ("train.beta", recipe.train.beta is None or recipe.train.beta > 0 or (
            recipe.train.beta == 0 and METHODS[recipe.train.method].default_beta == 0),
         "must be positive (or null: the method's default; 0 where that is the default)"),
        ("train.num_generations", recipe.train.num_generations >= 2, "must be at least 2 (a group needs a mean)"),
        ("train.temperature", recipe.train.temperature > 0, "must be positive"),
        ("train.top_p", 0 < recipe.train.top_p <= 1, "must be in (0, 1]"),
        ("train.vllm_gib", recipe.train.vllm_gib > 0, "must be positive"),
        ("train.numeric_tolerance", recipe.train.numeric_tolerance >= 0, "must be 0 or more"),
        ("train.simpo_gamma", recipe.train.simpo_gamma >= 0, "must be 0 or more"),
        ("train.kto_desirable_weight", recipe.train.kto_desirable_weight > 0, "must be positive"),
        ("train.kto_undesirable_weight", recipe.train.kto_undesirable_weight > 0, "must be positive"),
        ("train.max_grad_norm", recipe.train.max_grad_norm > 0, "must be positive"),
        ("train.loss_chunk_tokens", recipe.train.loss_chunk_tokens >= 0, "must be 0 (plain loss) or more"),
        ("train.tile_tokens", recipe.train.tile_tokens == 0 or recipe.train.tile_tokens >= 16,
         "must be 0 (off) or at least 16 tokens"),
        ("train.logging_steps", recipe.train.logging_steps >= 1, "must be at least 1"),
        ("train.eval_steps", recipe.train.eval_steps >= 0, "must be 0 or more"),
        ("train.save_steps", recipe.train.save_steps >= 0, "must be 0 or more"),
        ("train.save_total_limit", recipe.train.save_total_limit >= 1, "must be at least 1"),
        ("train.neftune_noise_alpha", recipe.train.neftune_noise_alpha is None or recipe.train.neftune_noise_alpha > 0,
         "must be positive (or null: off)"),
        ("train.sample_prompts", not isinstance(recipe.train.sample_prompts, int) or recipe.train.sample_prompts >= 0,
         "must be 0 (off), a number of eval prompts, or a file of prompts"),
        ("train.sample_max_new_tokens", recipe.train.sample_max_new_tokens >= 1, "must be at least 1"),
        ("train.eval_limit", recipe.train.eval_limit is None or recipe.train.eval_limit >= 1,
         "must be at least 1 (or null: every document)"),
    ]
    for key, ok, what in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(recipe, section), name)
            raise UserError(f"{where(key)}: '{key}' {what}, got {value!r}.")
    unknown = [name for name in recipe.train.report_to if name not in TRACKERS]
    if unknown:
        raise UserError(f"{where('train.report_to')}: 'train.report_to' has unknown tracker {unknown[0]!r}; valid: "
                        f"{', '.join(TRACKERS)} (a list, e.g. train.report_to=[tensorboard,wandb]).")
    method = METHODS[recipe.train.method]
    if recipe.train.micro_batch_size < method.min_micro_batch:
        least = method.min_micro_batch
        raise UserError(f"{where('train.micro_batch_size')}: train.method={method.name} needs train.micro_batch_size of "
                        f"at least {least}: {method.min_reason}. Set train.micro_batch_size={least} or more.")
    if method.data == "prompts":
        _check_prompt_method(recipe.train, recipe.data.max_seq_len, where)
    if not recipe.train.output_dir.strip():
        raise UserError(f"{where('train.output_dir')}: 'train.output_dir' must not be empty.")


def _check_prompt_method(t: TrainConfig, max_seq_len: int, where) -> None:
    """A method that samples its own completions (grpo): rewards to score them, whole groups per step."""
    if not t.rewards:
        raise UserError(f"{where('train.rewards')}: train.method={t.method} needs at least one reward in train.rewards, e.g. "
                        "train.rewards=[numeric_answer] or [think_format,my_rewards.py:score] (docs/grpo.md).")
    if t.reward_weights is not None and len(t.reward_weights) != len(t.rewards):
        raise UserError(f"{where('train.reward_weights')}: 'train.reward_weights' has {len(t.reward_weights)} weights "
                        f"for {len(t.rewards)} rewards; give one per train.rewards entry (or null: all 1).")
    if not 1 <= t.max_completion_len < max_seq_len:
        raise UserError(f"{where('train.max_completion_len')}: 'train.max_completion_len' must be at least 1 and below "
                        f"data.max_seq_len={max_seq_len} (the prompt needs room), got {t.max_completion_len}.")
    if (t.micro_batch_size * t.grad_accum) % t.num_generations:
        raise UserError(f"{where('train.num_generations')}: train.micro_batch_size x train.grad_accum = "
                        f"{t.micro_batch_size * t.grad_accum} completions per step must be a multiple of "
                        f"train.num_generations={t.num_generations} (whole groups of completions per prompt); "
                        "e.g. raise train.grad_accum.")


def _collect(problems: list[str], fn, *args) -> None:
    try:
        fn(*args)
    except UserError as e:
        problems.append(str(e))


def _refuse_other_tools(path: Path, data: dict, lines: dict[str, int]) -> None:
    """A config of another fine-tuning tool: say which, and give our key for each of its keys."""
    flat = [str(k) for k in data if k not in SECTIONS]
    tool = recognise(flat)
    if tool is None:
        return
    rows = []
    for key in flat:
        where = f"{path}:{lines.get(key, 1)}"
        if key in TRANSLATIONS:
            ours = TRANSLATIONS[key]
            rows.append(f"  {where} {key} -> {ours}" if ours else f"  {where} {key}: no equivalent (qlora-phi3 "
                        "always trains QLoRA on Phi-3 with its own chat template; drop it)")
        else:
            rows.append(f"  {where} {key}: unknown{_suggest(key, _all_keys())}")
    raise UserError(f"{path} looks like {'an' if tool[0] in 'AEIOU' else 'a'} {tool} config, not a qlora-phi3 recipe: a recipe has the sections "
                    f"{', '.join(SECTIONS)} (e.g. `lora:` then `  r: 16`). Its keys in qlora-phi3 terms:\n"
                    + "\n".join(rows) + "\nStart from a shipped recipe: `qlora-phi3 recipes copy phi3_mini_4k_12gb .`")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults, then the YAML file at ``path`` (if any), then ``section.key=value`` overrides."""
    import yaml

    recipe = Recipe()
    origins: dict[str, str] = {}  # dotted key -> where it was set, for error messages
    problems: list[str] = []
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            p = resolve_recipe(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the recipe as UTF-8."
                            + _data_file_hint(p))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{p}:{mark.line + 1}" if mark else str(p)
            raise UserError(f"{loc}: invalid YAML: {getattr(e, 'problem', None) or e}." + _data_file_hint(p))
        lines = _yaml_lines(text)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{p}: a recipe is a mapping with sections {', '.join(SECTIONS)}, got "
                            f"{type(data).__name__}." + _data_file_hint(p))
        if data and _data_file_hint(p) and not any(str(k) in SECTIONS for k in data):  # e.g. a one-record JSONL
            raise UserError(f"{p}: no recipe section ({', '.join(SECTIONS)})." + _data_file_hint(p))
        _refuse_other_tools(p, data, lines)
        for section, body in data.items():
            sec_where = f"{p}:{lines.get(str(section), 1)}"
            if section not in SECTIONS:
                problems.append(f"{sec_where}: unknown section '{section}'"
                                f"{_suggest(str(section), list(SECTIONS))}; sections are {', '.join(SECTIONS)}.")
                continue
            if body is None:
                continue
            if not isinstance(body, dict):
                problems.append(f"{sec_where}: section '{section}' must be a mapping of keys, got {body!r}.")
                continue
            for name, value in body.items():
                key = f"{section}.{name}"
                origins[key] = f"{p}:{lines.get(key, lines.get(section, 1))}"
                _collect(problems, _set_field, recipe, key, value, origins[key])
    for text in overrides or []:
        try:
            key, value = _parse_override(text)
        except UserError as e:
            problems.append(str(e))
            continue
        origins[key] = f"command line '{text}'"
        _collect(problems, _set_field, recipe, key, value, origins[key])
    if problems:  # every problem at once: fixing a recipe should not take one run per typo
        raise UserError("\n".join(problems))
    recipe.source = source
    _check_values(recipe, origins, source)
    return recipe


def _data_file_hint(path: Path) -> str:
    """For a data file given where the recipe goes (``qlora-phi3 data chats.jsonl``): where it belongs instead."""
    if not path.name.lower().endswith((".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".gz")):
        return ""
    return (f" {path.name} looks like a data file, not a recipe: name a recipe first and give the file as "
            f"data.path, e.g. `tiny_cpu data.path={path}`.")


def _absolute(path: str) -> str:
    """A local file or directory as an absolute path; Hub ids and ``embedded:`` names as they are."""
    if path.startswith("embedded:"):
        return path
    p = Path(path).expanduser()
    return str(p.absolute()) if p.exists() else path


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """A copy of ``recipe`` whose local model and data paths are absolute, so that a saved recipe (and
    ``chat RUN``, ``merge RUN``, ``--resume``) works from any working directory."""
    out = copy.deepcopy(recipe)
    out.model.name_or_path = _absolute(recipe.model.name_or_path)
    out.data.path = _absolute(recipe.data.path)
    if recipe.model.adapter:
        out.model.adapter = _absolute(recipe.model.adapter)
    if isinstance(recipe.train.sample_prompts, str):
        out.train.sample_prompts = _absolute(recipe.train.sample_prompts)
    if recipe.train.eval_include_path:
        out.train.eval_include_path = _absolute(recipe.train.eval_include_path)
    return out


def recipe_to_dict(recipe: Recipe) -> dict:
    return {section: dataclasses.asdict(getattr(recipe, section)) for section in SECTIONS}


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML that ``load_recipe`` reads back to the same values."""
    import yaml

    from qlora_phi3.files import atomic_write_text

    header = f"# Resolved recipe (defaults < {recipe.source} < command-line overrides).\n"
    # Atomic: `--resume` reads it back, so a crash mid-write must not leave half a recipe.
    atomic_write_text(path, header + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
