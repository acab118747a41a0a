"""Other tools' keys mapped to ours: the one table for every "you wrote their name for our setting" decision.

Used twice: a whole Axolotl / LLaMA-Factory / TrainingArguments config given as a recipe is recognised and
translated key by key, and a single habit in one of our recipes (``train.learning_rate=...``) gets the exact
key it meant.

People arrive with an Axolotl or LLaMA-Factory YAML, or a dict of Hugging Face ``TrainingArguments``;
flat keys like ``lora_r`` or ``learning_rate`` would each be "unknown". Instead we say which tool the
file is from and translate every key we can, so the user writes the recipe once, correctly.
"""

from __future__ import annotations

__all__ = ["TRANSLATIONS", "our_key", "recognise"]

# Their key -> our key, or None when qlora-phi3 has no such setting (and why, after a '#').
TRANSLATIONS: dict[str, str | None] = {
    # Axolotl
    "base_model": "model.name_or_path", "revision_of_model": "model.revision", "datasets": "data.path",
    "sequence_len": "data.max_seq_len", "sample_packing": "data.packing", "val_set_size": "data.eval_fraction",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules", "lora_target_linear": "lora.target_modules",
    "micro_batch_size": "train.micro_batch_size", "num_epochs": "train.epochs", "lr_scheduler": "train.lr_scheduler",
    "optimizer": "train.optimizer", "flash_attention": "model.attn_implementation",
    "adapter": None, "load_in_4bit": None, "load_in_8bit": None, "strict": None, "chat_template": None,
    "wandb_project": None, "special_tokens": None,
    # LLaMA-Factory
    "model_name_or_path": "model.name_or_path", "lora_rank": "lora.r", "lora_target": "lora.target_modules",
    "dataset": "data.path", "cutoff_len": "data.max_seq_len", "packing": "data.packing",
    "quantization_bit": None, "template": None, "stage": None, "finetuning_type": None, "do_train": None,
    "dataset_dir": None, "overwrite_output_dir": None, "plot_loss": None,
    # Hugging Face TrainingArguments (and TRL's SFTConfig)
    "output_dir": "train.output_dir", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "learning_rate": "train.lr", "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps", "lr_scheduler_type": "train.lr_scheduler", "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm", "optim": "train.optimizer",
    "gradient_checkpointing": "train.gradient_checkpointing", "seed": "train.seed", "logging_steps": "train.logging_steps",
    "eval_steps": "train.eval_steps", "save_steps": "train.save_steps", "save_total_limit": "train.save_total_limit",
    "max_seq_length": "data.max_seq_len", "max_length": "data.max_seq_len", "bf16": "model.compute_dtype",
    "fp16": "model.compute_dtype", "per_device_eval_batch_size": None, "eval_strategy": "train.eval_steps",
    "save_strategy": "train.save_steps", "logging_strategy": "train.logging_steps", "report_to": None,
}
# Habits that are no tool's config key but that people type for ours (generic names, our own leaves).
_HABITS = {"rank": "lora.r", "batch_size": "train.micro_batch_size", "model_name": "model.name_or_path",
           "model_id": "model.name_or_path", "target_modules": "lora.target_modules", "output": "train.output_dir"}


def our_key(their_key: str) -> str | None:
    """Our dotted key for another tool's key (or a common habit), None if there is none."""
    return TRANSLATIONS.get(their_key) or _HABITS.get(their_key)


# Keys that give a tool away (a flat key alone, like output_dir, could be anyone's).
_SIGNS = {
    "Axolotl": {"base_model", "datasets", "adapter", "sequence_len", "sample_packing", "lora_target_modules",
                "lora_target_linear", "num_epochs", "load_in_4bit", "val_set_size"},
    "LLaMA-Factory": {"model_name_or_path", "stage", "finetuning_type", "lora_target", "cutoff_len", "template",
                      "quantization_bit", "lora_rank", "dataset_dir"},
    "Hugging Face TrainingArguments": {"per_device_train_batch_size", "num_train_epochs", "lr_scheduler_type", "optim",
                                       "per_device_eval_batch_size", "eval_strategy", "save_strategy"},
}


def recognise(keys: list[str]) -> str | None:
    """The tool whose config has these top-level keys (at least two tell-tale keys), or None."""
    scores = {tool: len(signs & set(keys)) for tool, signs in _SIGNS.items()}
    tool, score = max(scores.items(), key=lambda kv: kv[1])
    return tool if score >= 2 else None
