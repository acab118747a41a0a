"""Shared fixtures: one tiny training run per test session, reused by every test that needs an adapter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "recipes" / "tiny_cpu.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The default tiny CPU recipe, trained once (this is the README's default run)."""
    from qlora_phi3.ui import quiet_library_noise
    from qlora_phi3.config import load_recipe
    from qlora_phi3.run.train import train

    quiet_library_noise()
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    recipe = load_recipe(TINY_RECIPE, [f"train.output_dir={out}"])
    return recipe, train(recipe)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from qlora_phi3.config import ModelConfig
    from qlora_phi3.model.load import load_tokenizer

    return load_tokenizer(ModelConfig())
