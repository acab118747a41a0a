"""What to tell a user whose run ran out of GPU memory: where the memory went and what would fit."""

from __future__ import annotations

import torch

from qlora_phi3.config import Recipe
from qlora_phi3.memory.estimate import estimate, format_breakdown

__all__ = ["is_oom", "oom_message", "suggestions"]


def is_oom(err: BaseException) -> bool:
    """A CUDA out-of-memory error (torch raises OutOfMemoryError; some kernels a RuntimeError that says so)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def suggestions(recipe: Recipe) -> list[str]:
    """Concrete recipe changes, cheapest in quality first; each as the override to type."""
    d, t = recipe.data, recipe.train
    out = []
    if t.micro_batch_size > 1:
        out.append(f"train.micro_batch_size={t.micro_batch_size // 2} train.grad_accum={t.grad_accum * 2} "
                   "(same effective batch, about half the activation memory)")
    if not t.gradient_checkpointing:
        out.append("train.gradient_checkpointing=true (saves several GB of activations for ~30% more compute)")
    elif t.gradient_checkpointing is True:
        out.append("train.gradient_checkpointing=offload (moves the saved layer inputs to CPU memory)")
    if d.max_seq_len > 256:
        out.append(f"data.max_seq_len={d.max_seq_len // 2} (activations and logits scale with it; "
                   "check what it cuts with `qlora-phi3 data`)")
    if t.optimizer in ("adamw_torch", "paged_adamw_32bit"):
        out.append("train.optimizer=paged_adamw_8bit (2 bytes of state per LoRA parameter instead of 8)")
    return out


def _breakdown(recipe: Recipe, model_config) -> str:
    """The estimator's view of the current settings, if the estimator is available."""
    try:
        return format_breakdown(estimate(recipe, model_config, device="cuda"))
    except Exception as e:  # the advice must still come out if the estimate cannot be made
        return f"(no estimate: {e})"


def oom_message(recipe: Recipe, model_config, device: str, step: int) -> str:
    lines = [f"out of GPU memory at step {step} on {device} with data.max_seq_len={recipe.data.max_seq_len}, "
             f"train.micro_batch_size={recipe.train.micro_batch_size}, lora.r={recipe.lora.r}. Nothing "
             "half-written was saved; complete checkpoints are kept."]
    breakdown = _breakdown(recipe, model_config)
    if breakdown:
        lines.append("Estimated memory for these settings:\n" + breakdown)
    tips = suggestions(recipe)
    if tips:
        lines.append("Changes that reduce memory (try the first that is acceptable):\n"
                     + "\n".join(f"  - {tip}" for tip in tips))
    lines.append("`qlora-phi3 fit RECIPE --budget <your GPU memory>` writes a recipe predicted to fit.")
    return "\n".join(lines)
