"""LoRA adapters on Phi-3's fused projections, with a coverage check that never lets a target go missing.

PEFT only raises when *no* target matches, so a Llama-style list (q_proj, k_proj, ...) on Phi-3
silently adapts only o_proj and down_proj. We check every target name on its own first.

The variants are PEFT's (``lora.use_rslora``, ``lora.use_dora``, ``lora.init``). Two initialisations do not
start from "base + zero update": OLoRA moves part of each base weight into the adapter (and re-quantizes
the rest), LoftQ fits the adapter to the 4-bit quantization error. Their trained adapter is saved
converted to a plain LoRA against the *original* base weights (PEFT's ``path_initial_model_for_weight_
conversion``: rank 2r, the update minus the initial adapter), so merge, chat and export treat it like any
other adapter. Checkpoints keep the unconverted weights: a resumed run recomputes the same initialisation.
"""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_phi3.config import LoraSettings, ModelConfig
from qlora_phi3.errors import UserError

if TYPE_CHECKING:
    from qlora_phi3.model.load import ModelSource

__all__ = ["Coverage", "adapter_dir", "attach_lora", "check_adapter_fits", "check_lora_variant", "check_still_tied",
           "check_targets", "coverage", "initial_adapter_dir", "is_tied", "load_adapter_weights", "lora_config"]

# Initialisations that change what the adapter means at step 0, so the saved adapter is converted (module doc).
CONVERTED_INITS = ("olora", "loftq")

# Llama/Mistral names that Phi-3 fuses, and the fused module to use instead.
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "dense": "o_proj", "fc1": "gate_up_proj",
          "fc2": "down_proj", "Wqkv": "qkv_proj", "out_proj": "o_proj", "query_key_value": "qkv_proj"}


def _linear_leaf_names(model) -> dict[str, int]:
    """Leaf name -> how many Linear(-like) modules carry it (4-bit Linear4bit included)."""
    import torch

    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            leaf = name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def is_tied(model) -> bool:
    """Whether the model's output head is its input embedding (one matrix): Phi-4-mini's tie_word_embeddings."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def _head_problem(model, target: str) -> str:
    config = model.config
    if is_tied(model):
        return (f"'{target}': this model ties its input embeddings and output head (tie_word_embeddings: true, as "
                f"Phi-4-mini): one {config.vocab_size:,} x {config.hidden_size:,} matrix is both, so an adapter on "
                "either one changes the other too, and merging it would untie them into two matrices (a second "
                f"{config.vocab_size * config.hidden_size * 2 / 1e9:.1f} GB copy in 16-bit). qlora-phi3 keeps the "
                f"tied matrix frozen and adapts the decoder layers; remove '{target}'")
    return (f"'{target}': qlora-phi3 adapts the decoder layers' linear projections only; the embeddings and output "
            f"head stay frozen in 16-bit. Remove '{target}'")


def check_targets(model, targets: list[str]) -> None:
    """Raise a UserError naming every target that matches no module, and what to use instead."""
    available = _linear_leaf_names(model)
    problems = []
    for target in targets:
        if target in ("lm_head", "embed_tokens", "embed", "wte", "output"):
            problems.append(_head_problem(model, target))
            continue
        if target in available:
            continue
        if target in _FUSED and _FUSED[target] in available:
            problems.append(f"'{target}' matches nothing: Phi-3 fuses it into '{_FUSED[target]}'")
        else:
            close = difflib.get_close_matches(target, list(available), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"'{target}' matches no module{hint}")
    if problems:
        raise UserError("lora.target_modules: " + "; ".join(problems)
                        + f". Modules this model has: {', '.join(sorted(available))}. "
                        "Phi-3 default: lora.target_modules=qkv_proj,o_proj,gate_up_proj,down_proj.")


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # A list (not a regex): PEFT matches each as a whole leaf name, so 'o_proj' cannot catch 'foo_proj'.
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        # LoftQ on a 4-bit base starts from PEFT's default adapter and replaces it (replace_lora_weights_loftq).
        init_lora_weights={"default": True, "gaussian": "gaussian", "olora": "olora"}.get(settings.init, True),
    )


def _safetensors_path(model: ModelConfig | ModelSource) -> str | None:
    """The base model's 16-bit weights on this machine, as PEFT's LoftQ reads them (a file, or a sharded
    model's first-file name beside its index); None when they are not here."""
    from qlora_phi3.model.load import ModelSource, resolve_model_path

    local = Path(model.path if isinstance(model, ModelSource) else resolve_model_path(model.name_or_path)).expanduser()
    if local.is_dir():
        found = [n for n in ("model.safetensors", "model.safetensors.index.json") if (local / n).is_file()]
        return str(local / "model.safetensors") if found else None
    from huggingface_hub import try_to_load_from_cache

    for name in ("model.safetensors", "model.safetensors.index.json"):
        cached = try_to_load_from_cache(model.name_or_path, name, revision=model.revision)
        if isinstance(cached, str):
            return str(Path(cached).parent / "model.safetensors")
    return None


def check_lora_variant(settings: LoraSettings, model: ModelConfig | ModelSource, vllm: bool = False) -> None:
    """Variant settings that cannot work on a 4-bit base, or (``vllm``: GRPO sampling with train.generator=vllm)
    that vLLM cannot load as a LoRA over the original base, refused before the model loads."""
    if vllm:
        _check_vllm_lora(settings)
    if settings.init == "pissa":
        raise UserError("lora.init=pissa: PEFT's PiSSA takes an SVD of the 16-bit weight and rewrites the base with "
                        "the residual, which a 4-bit base cannot hold (PEFT: 'initialize PiSSA under float32, float16, "
                        "or bfloat16'). On a 4-bit base use lora.init=olora (the same idea with a QR decomposition, "
                        "supported by PEFT on 4-bit weights) or lora.init=loftq.")
    if settings.init in CONVERTED_INITS and settings.use_dora:
        raise UserError(f"lora.init={settings.init} with lora.use_dora=true: the saved adapter is converted to a plain "
                        "LoRA against the original base (rank 2r), which PEFT cannot do for DoRA's magnitude vector; "
                        "use one of the two.")
    if settings.init == "loftq" and _safetensors_path(model) is None:
        raise UserError(f"lora.init=loftq: LoftQ fits the adapter to the quantization error of each weight, so it reads "
                        f"the 16-bit weights from safetensors files, and {model.name_or_path} has none on this "
                        "machine; download the model first (hf download ...) or use another lora.init.")


def _check_vllm_lora(settings: LoraSettings) -> None:
    why = None
    if settings.use_dora:
        why = "lora.use_dora=true: vLLM loads no DoRA adapter ('vLLM does not yet support DoRA')"
    elif settings.init in CONVERTED_INITS:
        why = (f"lora.init={settings.init}: the adapter trains against a base it rewrote, and vLLM loads the "
               "original base (the saved adapter is converted only when training ends)")
    elif settings.r > 512:
        why = f"lora.r={settings.r}: vLLM's LoRA ranks stop at 512"
    if why:
        raise UserError(f"train.generator=vllm with {why}; use train.generator=transformers, or change the LoRA "
                        "setting.")


def attach_lora(model, settings: LoraSettings, model_cfg: ModelConfig | ModelSource | None = None):
    """Wrap the frozen 4-bit model with trainable fp32 LoRA adapters on the checked targets.

    We skip ``prepare_model_for_kbit_training``: it upcasts all non-quantized weights to fp32 (~0.4 GB on
    Phi-3-mini) for no benefit with bf16 compute. Activation checkpointing is the Trainer's to turn on
    (``run.train`` passes it in the training arguments), non-reentrant, so no input grads are needed.
    ``model_cfg`` (the base's identity) is needed for lora.init=loftq, which reads its 16-bit weights."""
    from peft import get_peft_model

    check_targets(model, settings.target_modules)
    # autocast_adapter_dtype keeps LoRA weights in fp32 even over a bf16/fp16 base (needed for fp16 loss scaling).
    peft_model = get_peft_model(model, lora_config(settings), autocast_adapter_dtype=True)
    check_still_tied(peft_model.get_base_model(), "attaching LoRA")
    if settings.init == "loftq":
        check_lora_variant(settings, model_cfg or ModelConfig())
        _loftq_replace(peft_model, _safetensors_path(model_cfg or ModelConfig()))
    if settings.init in CONVERTED_INITS:
        # PEFT's conversion reads the initial adapter from disk at save time: keep it in a temp dir for this process.
        keep = tempfile.TemporaryDirectory(prefix="qlora-phi3-initial-")
        peft_model.save_pretrained(str(Path(keep.name) / "initial"), safe_serialization=True)
        peft_model._qlora_initial_adapter = keep  # the directory lives as long as the model
    return peft_model


def _loftq_replace(peft_model, weights_path: str) -> None:
    """LoftQ on the 4-bit base (one step): each adapter starts as the best rank-r fit of its weight's quantization
    error, so base + adapter starts closer to the 16-bit model than the 4-bit base alone.

    By hand, not ``peft.replace_lora_weights_loftq``, for two reasons (PEFT 0.21): it computes on "cuda" (or
    "xpu") unconditionally, so it cannot run on a CPU, and it sets A and B to the factors of the residual without
    dividing by the LoRA scaling (alpha / r), so with alpha != r the adapter adds a multiple of the error. The
    math is PEFT's: residual = W16 - dequantize(W4); truncated SVD; sqrt of the singular values on each side.
    """
    import json

    import torch
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    path = Path(weights_path)
    index = path.parent / "model.safetensors.index.json"
    shard_of = (json.loads(index.read_text())["weight_map"] if not path.is_file() and index.is_file() else None)
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit) or "default" not in module.lora_A:
            continue
        key = name[len(prefix):] + ".weight" if name.startswith(prefix) else name + ".weight"
        with safe_open(str(path.parent / shard_of[key]) if shard_of else str(path), framework="pt") as f:
            w16 = f.get_tensor(key).float()
        weight = module.get_base_layer().weight
        with torch.no_grad():
            residual = w16 - dequantize_4bit(weight.data, weight.quant_state).float()
            r, scaling = module.r["default"], module.scaling["default"]
            u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
            root = sv[:r].sqrt()
            module.lora_A["default"].weight.data = (root[:, None] * vh[:r]).to(module.lora_A["default"].weight.dtype)
            module.lora_B["default"].weight.data = (u[:, :r] * root[None] / scaling).to(module.lora_B["default"].weight.dtype)


def check_still_tied(model, when: str) -> None:
    """A tied model (Phi-4-mini) must keep one matrix for embeddings and head: never untied silently."""
    if not is_tied(model):
        return
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        raise UserError(f"{when} untied the model's embeddings and output head (tie_word_embeddings: true); this is "
                        "a bug in qlora-phi3 or PEFT, please report it with the recipe.")


def initial_adapter_dir(peft_model) -> str | None:
    """Where the step-0 adapter of an OLoRA/LoftQ model is kept (for ``save_pretrained``'s
    ``path_initial_model_for_weight_conversion``); None for the other initialisations."""
    keep = getattr(peft_model, "_qlora_initial_adapter", None)
    return str(Path(keep.name) / "initial") if keep is not None else None


@dataclass
class Coverage:
    target: str
    layers_adapted: int
    layers_total: int
    trainable_params: int


def coverage(peft_model, targets: list[str]) -> list[Coverage]:
    """Per target: how many of the model's layers got an adapter, and its trainable parameters."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    total_layers = getattr(base.config, "num_hidden_layers", 0)
    rows = []
    for target in targets:
        adapted, params = 0, 0
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and name.rsplit(".", 1)[-1] == target:
                adapted += 1
                params += sum(p.numel() for n, p in module.named_parameters() if "lora_" in n and p.requires_grad)
        rows.append(Coverage(target, adapted, total_layers, params))
    return rows


def adapter_dir(path: str | Path) -> Path:
    """The adapter directory of ``path``: a run directory (its ``adapter/``) or an adapter directory itself."""
    p = Path(path).expanduser()
    for candidate in (p / "adapter", p):
        if (candidate / "adapter_config.json").is_file() and (candidate / "adapter_model.safetensors").is_file():
            return candidate
    raise UserError(f"model.adapter={path}: no adapter there (adapter_config.json and adapter_model.safetensors, in "
                    "the directory or in its adapter/); give a finished run's directory, e.g. model.adapter=runs/sft.")


def check_adapter_fits(path: str | Path, settings: LoraSettings, model_cfg: ModelConfig) -> None:
    """Refuse, before any model loads, an adapter to continue whose LoRA shape differs from ``settings`` or that
    was trained on another base model; each difference is named with the key to set."""
    import json

    directory = adapter_dir(path)
    saved = json.loads((directory / "adapter_config.json").read_text())
    wanted = {"r": settings.r, "lora_alpha": settings.alpha, "use_dora": settings.use_dora,
              "use_rslora": settings.use_rslora}
    keys = {"r": "lora.r", "lora_alpha": "lora.alpha", "use_dora": "lora.use_dora", "use_rslora": "lora.use_rslora"}
    problems = [f"{keys[k]}={str(saved.get(k)).lower() if isinstance(saved.get(k), bool) else saved.get(k)} (the "
                f"adapter's; the recipe has {v})" for k, v in wanted.items() if saved.get(k, v) != v]
    targets = sorted(saved.get("target_modules") or [])
    if targets != sorted(settings.target_modules):
        problems.append(f"lora.target_modules=[{','.join(targets)}] (the adapter's; the recipe has "
                        f"{sorted(settings.target_modules)})")
    if problems:
        raise UserError(f"model.adapter={path}: the adapter in {directory} has another LoRA shape than the recipe; to "
                        f"continue it set: {'; '.join(problems)}.")
    meta_path = directory / "qlora_phi3.json"
    if meta_path.is_file():
        base = json.loads(meta_path.read_text()).get("base_model")
        if base and base != model_cfg.name_or_path:
            raise UserError(f"model.adapter={path}: the adapter was trained on {base}, but model.name_or_path is "
                            f"{model_cfg.name_or_path}; set model.name_or_path={base}.")


def load_adapter_weights(peft_model, path: str | Path) -> None:
    """Put the weights of the adapter at ``path`` into ``peft_model``'s (trainable) adapter: training continues it."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = adapter_dir(path)
    state = load_file(str(directory / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(f"model.adapter={path}: the adapter's weights do not fit the model ({len(missing)} missing, "
                        f"{len(result.unexpected_keys)} unexpected, e.g. "
                        f"{(missing + list(result.unexpected_keys))[0]}); was it trained on this base model?")
