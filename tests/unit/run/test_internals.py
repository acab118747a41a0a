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


def test_every_registered_upstream_private_still_holds():
    """Each entry of the registry: what we rely on, checked against the installed libraries."""
    from qlora_phi3.run.internals import UPSTREAM, check_upstream

    assert len(UPSTREAM) >= 9
    assert check_upstream() == []


def test_a_moved_upstream_private_is_named(monkeypatch):
    from qlora_phi3.run import internals

    monkeypatch.setitem(internals.PHI3_LAYER_DIGESTS, "Phi3DecoderLayer.forward", "0" * 16)
    moved = internals.check_upstream()
    assert len(moved) == 1 and "Phi3DecoderLayer.forward" in moved[0] and "run/tiling.py" in moved[0]
