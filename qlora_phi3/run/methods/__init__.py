"""Training methods: each one a small module with its data encoding and its trainer.

Which methods exist, and what the layers below need to know of each (data kind, rows per sample, reference
forward, default beta, metrics), is the methods table, :mod:`qlora_phi3.methods`; each entry names its module
here. A module conforms to :class:`MethodModule`, and :mod:`qlora_phi3.run.train` runs any of them through the same
path. What they share (TrainingArguments, the trainer build, token counts) is :mod:`.base`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qlora_phi3.methods import METHODS

if TYPE_CHECKING:
    from qlora_phi3.config import Recipe
    from qlora_phi3.run.methods.base import MethodData

__all__ = ["MethodModule", "get_method"]


class MethodModule(Protocol):
    """What a method's module provides (its functions, module-level; tests/unit/run/test_methods.py checks each)."""

    def load_data(self, recipe: Recipe, tokenizer, records=None) -> MethodData:
        """Read, validate, split and encode the recipe's data, saying what was skipped or cut. ``records``: the
        training split's records and their report, already read (``data.split.read_training_records``, as the
        preflight does), or None to read them here."""

    def training_arguments(self, recipe: Recipe, output_dir: Path, device: str, compute_dtype: str,
                           measuring: bool):
        """The TRL config of the method's trainer (``base.common_arguments`` plus the method's own keys)."""

    def build_trainer(self, model, tokenizer, args, data: MethodData, device: str, *, recipe: Recipe,
                      measuring: bool, cpu_memory: str, callbacks: list):
        """(trainer, progress display, memory meter), built with ``base.build_method_trainer``."""

    def eval_fields(self, metrics: dict) -> dict:
        """run.json fields from an evaluation's metrics beyond the eval loss (``base.eval_fields_of``)."""


def get_method(name: str) -> MethodModule:
    """The module of training method ``name`` (a value of ``train.method``, checked by the schema), imported on use:
    each pulls in its TRL trainer."""
    return importlib.import_module(METHODS[name].module)
