"""Training methods: each one a small module with its data encoding, trainer and estimator terms.

A method module has ``NAME``, ``load_data(recipe, tokenizer) -> MethodData``, ``training_arguments(recipe,
output_dir, device, compute_dtype, measuring)``, ``build_trainer(model, tokenizer, args, data, device, *, recipe,
measuring, cpu_memory, callbacks) -> (trainer, progress, meter)`` and ``eval_fields(metrics) -> dict``.
:mod:`qlora_phi3.run.train` runs any of them through the same path. The estimator's terms of each method are
data in :mod:`qlora_phi3.memory.estimate` (``METHOD_TERMS``), since the memory layer sits below this one.
"""

from __future__ import annotations

import importlib

__all__ = ["METHODS", "get_method"]

# train.method -> module (imported on use: each pulls in its TRL trainer)
METHODS = {"sft": "sft", "dpo": "dpo", "orpo": "orpo", "kto": "kto", "simpo": "simpo", "grpo": "grpo"}


def get_method(name: str):
    """The module of training method ``name`` (a value of ``train.method``, checked by the schema)."""
    return importlib.import_module(f"qlora_phi3.run.methods.{METHODS[name]}")
