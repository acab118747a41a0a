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


def test_a_reshaped_trl_method_we_override_is_named():
    from trl import DPOTrainer

    class DPOTrainer(DPOTrainer):  # the registry knows TRL's trainers by class name
        def _prepare_dataset(self, dataset, processing_class, args):  # TRL dropped a parameter
            return dataset

    with pytest.raises(RuntimeError, match=r"DPOTrainer._prepare_dataset is now \(dataset, processing_class, args\).*"
                                           r"checked against trl"):
        check_trainer_internals(DPOTrainer)


def test_every_trl_trainer_we_subclass_is_registered():
    from qlora_phi3.run.internals import TRL_TRAINER_METHODS, _trl_trainers

    assert {cls.__name__ for cls in _trl_trainers()} == set(TRL_TRAINER_METHODS)


def test_the_attention_check_can_fail(monkeypatch):
    """config._attn_implementation must stay the property transformers resolves the attention with: a plain
    attribute (what setting it and reading it back would also accept) fails the check."""
    from transformers import PretrainedConfig

    from qlora_phi3.run import internals

    monkeypatch.setattr(PretrainedConfig, "_attn_implementation", "sdpa")
    moved = internals.check_upstream()
    assert len(moved) == 1 and "config._attn_implementation" in moved[0], moved


def test_the_fused_head_check_names_a_field_we_fill_that_trl_dropped(monkeypatch):
    from qlora_phi3.run import internals

    monkeypatch.setattr(internals, "LABEL_LOGPROB_FIELDS", (*internals.LABEL_LOGPROB_FIELDS, "answer_logps"))
    moved = internals.check_upstream()
    assert len(moved) == 1 and "fused_lm_head=True" in moved[0] and "run/logprobs.py" in moved[0], moved
