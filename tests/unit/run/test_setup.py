"""run/train.py's setup: what it does once for the whole run (resolve the model reference, ask the Hub)."""

import pytest

from qlora_phi3.config import load_recipe, recipes_dir


def _setup(tmp_path, *overrides):
    """setup() of a tiny run (no step trained); its memory meter closed."""
    from qlora_phi3.run.train import setup

    recipe = load_recipe(recipes_dir() / "tiny_cpu.yaml", ["data.max_samples=24", "train.sample_prompts=0",
                                                           f"train.output_dir={tmp_path / 'run'}", *overrides])
    run = setup(recipe)
    run.meter.close()
    return run


def _counting(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_setup_resolves_the_model_and_asks_the_hub_once(tmp_path, monkeypatch):
    import qlora_phi3.model.load as load

    resolved = _counting(monkeypatch, load, "resolve_model_path")
    probed = _counting(monkeypatch, load, "ensure_hub_access")
    run = _setup(tmp_path)
    # config, tokenizer, model and LoRA all took the one resolved reference
    assert len(resolved) == 1 and len(probed) == 1, (resolved, probed)
    assert run.source.name_or_path == resolved[0][0] and run.trainer.model is not None
