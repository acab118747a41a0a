"""Checkpoints (run/checkpoints.py) and the adapter save under FSDP (run/train.py): what counts as resumable."""

from types import SimpleNamespace

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from qlora_phi3.run.checkpoints import is_complete, last_checkpoint
from qlora_phi3.run.train import gather_state_dict


def _make(path, files=(), dirs=()):
    path.mkdir(parents=True)
    for f in files:
        (path / f).write_text("x")
    for d in dirs:
        (path / d).mkdir()
    return path


def test_plain_and_fsdp_sharded_checkpoints_are_complete_partial_ones_are_not(tmp_path):
    plain = _make(tmp_path / "checkpoint-2", ["adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                                             "scheduler.pt", "trainer_state.json"])
    # accelerate's save_fsdp_model / save_fsdp_optimizer with SHARDED_STATE_DICT: directories, no adapter file.
    sharded = _make(tmp_path / "checkpoint-4", ["scheduler.pt", "trainer_state.json"],
                    ["pytorch_model_fsdp_0", "optimizer_0"])
    partial = _make(tmp_path / "checkpoint-6", ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt"])
    assert is_complete(plain) and is_complete(sharded) and not is_complete(partial)
    assert last_checkpoint(tmp_path) == sharded  # the newest complete one; --resume continues from it


@pytest.mark.slow  # reuses the session's trained run
def test_under_fsdp_the_adapter_is_gathered_from_every_rank(tiny_run, tmp_path):
    from qlora_phi3.run.train import _save_adapter

    recipe, result = tiny_run
    calls = []
    full = {k: v.clone() for k, v in result.model.state_dict().items()}
    key = next(k for k in full if "lora_B" in k)
    full[key] = full[key] + 1.0  # what the gather returns differs from rank 0's local view

    def get_state_dict(model):
        calls.append(model)
        return full

    fsdp = SimpleNamespace(is_fsdp_enabled=True, model=result.model,
                           accelerator=SimpleNamespace(get_state_dict=get_state_dict))
    state = gather_state_dict(fsdp)
    assert calls == [result.model] and state is full
    assert gather_state_dict(SimpleNamespace(is_fsdp_enabled=False)) is None  # plain runs: PEFT reads the weights
    _save_adapter(result.model, AutoTokenizer.from_pretrained(result.adapter_dir), recipe, tmp_path / "adapter", state)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved_key = next(k for k in saved if k.replace(".weight", "") in key.replace(".default", ""))
    assert (saved[saved_key].float() - full[key].float()).abs().max() == 0
