"""The private Trainer methods we override are named in one place, and a change to them is caught."""

import pytest
from transformers import Trainer

from qlora_phi3.run.internals import PRIVATE_TRAINER_METHODS, check_trainer_internals


def test_installed_transformers_has_the_methods_we_override():
    check_trainer_internals()  # raises when a method is gone or its parameters changed
    from qlora_phi3.run.checkpoints import AtomicCheckpoints

    for name in PRIVATE_TRAINER_METHODS:
        assert name in vars(AtomicCheckpoints), name  # the mixin really overrides what the module names


def test_a_renamed_or_reshaped_method_stops_with_a_clear_message():
    class Moved(Trainer):
        _save_checkpoint = None

    with pytest.raises(RuntimeError, match=r"Trainer._save_checkpoint is gone.*checked against transformers"):
        check_trainer_internals(Moved)

    class Reshaped(Trainer):
        def _get_output_dir(self, trial, run_name):  # a new parameter
            return ""

    with pytest.raises(RuntimeError, match=r"_get_output_dir is now \(trial, run_name\)"):
        check_trainer_internals(Reshaped)
