"""The private parts of transformers' Trainer that qlora-phi3 relies on, named in one place.

Atomic checkpoints (:mod:`qlora_phi3.run.checkpoints`) must redirect where the Trainer writes a
checkpoint and run code after it is written; the Trainer has no public hook for either (callbacks'
``on_save`` runs after the files are already in place). So we override two private methods. They were
checked against the version below; :func:`check_trainer_internals` runs when a trainer is built (and in
tests/test_internals.py), so a transformers release that renames or reshapes them stops with a clear
message instead of silently writing non-atomic checkpoints.
"""

from __future__ import annotations

import inspect

__all__ = ["CHECKED_TRANSFORMERS", "PRIVATE_TRAINER_METHODS", "check_trainer_internals"]

CHECKED_TRANSFORMERS = "5.24.0"
# method name -> its parameters (after self), as overridden in checkpoints.AtomicCheckpoints
PRIVATE_TRAINER_METHODS = {"_save_checkpoint": ("model", "trial"), "_get_output_dir": ("trial",)}


def check_trainer_internals(trainer_cls=None) -> None:
    """Raise RuntimeError naming what moved if the Trainer's private methods we override changed."""
    import transformers

    trainer_cls = trainer_cls or transformers.Trainer
    for name, params in PRIVATE_TRAINER_METHODS.items():
        method = getattr(trainer_cls, name, None)
        found = None if method is None else tuple(inspect.signature(method).parameters)[1:]
        if found != params:
            now = "gone" if method is None else "now (" + ", ".join(found) + ")"
            raise RuntimeError(
                f"transformers {transformers.__version__}: Trainer.{name} is {now}, but qlora-phi3's atomic checkpoints "
                f"override it as ({', '.join(params)}) (checked against transformers {CHECKED_TRANSFORMERS}). "
                "Install a transformers version qlora-phi3 supports (see pyproject.toml) or update "
                "qlora_phi3/run/checkpoints.py.")
