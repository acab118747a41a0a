"""LoRA adapters on Phi-3's fused projections, with a coverage check that never lets a target go missing.

PEFT only raises when *no* target matches, so a Llama-style list (q_proj, k_proj, ...) on Phi-3
silently adapts only o_proj and down_proj. We check every target name on its own first.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from qlora_phi3.config import LoraSettings
from qlora_phi3.errors import UserError

__all__ = ["Coverage", "attach_lora", "check_targets", "coverage", "lora_config"]

# Llama/Mistral names that Phi-3 fuses, and the fused module to use instead.
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "dense": "o_proj", "fc1": "gate_up_proj",
          "fc2": "down_proj", "Wqkv": "qkv_proj", "out_proj": "o_proj", "query_key_value": "qkv_proj"}


def _linear_leaf_names(model) -> dict[str, int]:
    """Leaf name -> how many Linear(-like) modules carry it (4-bit Linear4bit included)."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            leaf = name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def check_targets(model, targets: list[str]) -> None:
    """Raise a UserError naming every target that matches no module, and what to use instead."""
    available = _linear_leaf_names(model)
    problems = []
    for target in targets:
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
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # A list (not a regex): PEFT matches each as a whole leaf name, so 'o_proj' cannot catch 'foo_proj'.
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, settings: LoraSettings):
    """Wrap the frozen 4-bit model with trainable fp32 LoRA adapters on the checked targets.

    We skip ``prepare_model_for_kbit_training``: it upcasts all non-quantized weights to fp32 (~0.4 GB on
    Phi-3-mini) for no benefit with bf16 compute. Activation checkpointing is the Trainer's to turn on
    (``run.train`` passes it in the training arguments), non-reentrant, so no input grads are needed."""
    check_targets(model, settings.target_modules)
    # autocast_adapter_dtype keeps LoRA weights in fp32 even over a bf16/fp16 base (needed for fp16 loss scaling).
    return get_peft_model(model, lora_config(settings), autocast_adapter_dtype=True)


@dataclass
class Coverage:
    target: str
    layers_adapted: int
    layers_total: int
    trainable_params: int


def coverage(peft_model, targets: list[str]) -> list[Coverage]:
    """Per target: how many of the model's layers got an adapter, and its trainable parameters."""
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
