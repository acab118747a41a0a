"""bench/grpo_compare.py compares at the 12 GB GRPO recipe's own settings (no training here): our run changes only
the model, data, lengths, steps and reward of the shipped recipe, and the reward both pipelines use is one float per
completion in TRL's signature."""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench.grpo_compare import RECIPE, _recipe_overrides, digit_share  # noqa: E402
from qlora_phi3.config import load_recipe  # noqa: E402


def test_ours_keeps_every_memory_setting_of_the_recipe(tmp_path):
    args = argparse.Namespace(model=str(tmp_path / "m"), data=str(tmp_path / "p.jsonl"), prompt_len=128,
                              completion_len=256, workdir=str(tmp_path), steps=2, chunk=256)
    shipped, ours = load_recipe(RECIPE), load_recipe(RECIPE, _recipe_overrides(args))
    for key in ("num_generations", "micro_batch_size", "grad_accum", "beta", "optimizer", "gradient_checkpointing",
                "temperature", "top_p", "lr", "loss_chunk_tokens"):
        assert getattr(ours.train, key) == getattr(shipped.train, key), key
    assert ours.lora == shipped.lora
    assert (ours.model.quant_type, ours.model.double_quant) == (shipped.model.quant_type, shipped.model.double_quant)
    assert ours.data.max_seq_len - ours.train.max_completion_len == 128 and ours.train.max_completion_len == 256
    assert ours.model.adapter is None and ours.train.max_steps == 2


def test_the_shared_reward_scores_each_completion_in_trls_shapes():
    chat = [[{"role": "assistant", "content": "12ab"}], [{"role": "assistant", "content": ""}]]
    assert digit_share(["p", "p"], chat, [[1], []]) == [0.5, 0.0]
    assert digit_share(["p"], ["1 2 3 4"], None, answer=["7"], trainer_state=None) == [4 / 7]
