"""LoRA variants (rsLoRA, DoRA, OLoRA and LoftQ initialisation) and NEFTune, each end to end on the tiny model: a few
training steps, --resume, merge with its report, chat; PiSSA on the 4-bit base is refused before loading."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from conftest import cpu_dtype
from qlora_phi3.cli import main
from qlora_phi3.config import load_recipe
from qlora_phi3.errors import UserError

pytestmark = pytest.mark.slow  # every test here trains, or reuses a trained run, or starts a process

FAST = ["train.max_steps=2", "train.save_steps=2", "train.eval_steps=0", "train.logging_steps=1",
        "data.max_samples=32", "data.max_eval_samples=4", "train.micro_batch_size=8", "train.sample_prompts=1",
        "train.sample_max_new_tokens=4"]
VARIANTS = {
    "rslora": ["lora.use_rslora=true"],
    "dora": ["lora.use_dora=true"],
    "olora": ["lora.init=olora"],
    "loftq": ["lora.init=loftq"],
    "neftune": ["train.neftune_noise_alpha=5"],
}
PROMPT = "What is the capital of Zorvia?"


def _logits(model, tokenizer, autocast: bool):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(**ids).logits.float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_resumes_merges_and_chats(variant, tmp_path, tiny_tokenizer, monkeypatch):
    import transformers.trainer
    from transformers import AutoModelForCausalLM

    from qlora_phi3.run.train import train

    # NEFTune is the Trainer's own hook on the input embeddings: record that our key turned it on, and with what
    real_activate, activated = transformers.trainer.activate_neftune, []
    monkeypatch.setattr(transformers.trainer, "activate_neftune",
                        lambda model, alpha, *a, **k: activated.append(alpha) or real_activate(model, alpha, *a, **k))

    out = tmp_path / "run"
    recipe = load_recipe("tiny_cpu", [f"train.output_dir={out}", *FAST, *VARIANTS[variant]])
    first = train(recipe)
    assert first.run["status"] == "completed" and first.run["steps"] == 2
    assert activated == ([5.0] if variant == "neftune" else [])
    # --resume with more steps: the saved recipe (variant included) continues from checkpoint-2
    again = load_recipe("tiny_cpu", [f"train.output_dir={out}", *FAST, *VARIANTS[variant], "train.max_steps=3"])
    result = train(again, resume=True)
    assert result.run["steps"] == 3 and result.run["resumes"][0]["from"] == "checkpoint-2"
    assert result.run["recipe"] == {**first.run["recipe"], "train": {**first.run["recipe"]["train"], "max_steps": 3}}

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(result.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert config["use_dora"] == (variant == "dora") and config["use_rslora"] == (variant == "rslora")
    assert any("lora_magnitude_vector" in k for k in keys) == (variant == "dora")
    if variant in ("olora", "loftq"):
        # converted to a plain LoRA against the original base: rank 2r (the update minus the initial adapter)
        assert config["r"] == 2 * recipe.lora.r and config["init_lora_weights"] is True

    merged_dir = tmp_path / "merged"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["merge", str(out), "--out", str(merged_dir), "--report-samples", "2"]) == 0
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert report["merge_rounding_b_vs_c"]["max_abs_logit_diff"] < 0.5  # (b) merged = (c) base + adapter in 16-bit
    # the merged model is the model as trained (its residual 4-bit base for OLoRA, LoftQ's fitted adapter included)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    trained = _logits(result.model.eval(), tiny_tokenizer, autocast=True)
    diff = (_logits(merged, tiny_tokenizer, autocast=False) - trained).abs()
    assert diff.mean() < 0.25 * trained.abs().mean(), (diff.mean(), trained.abs().mean())

    assert main(["chat", str(out), "--prompt", PROMPT, "--max-new-tokens", "4"]) == 0


def test_variant_keys_reach_peft_and_trl():
    from peft import LoraConfig

    from qlora_phi3.model.lora import lora_config
    from qlora_phi3.run.methods.sft import training_arguments as _sft_config

    recipe = load_recipe("tiny_cpu", ["lora.use_rslora=true", "lora.use_dora=true", "lora.init=gaussian",
                                      "train.neftune_noise_alpha=5"])
    cfg = lora_config(recipe.lora)
    assert isinstance(cfg, LoraConfig) and cfg.use_rslora and cfg.use_dora and cfg.init_lora_weights == "gaussian"
    args = _sft_config(recipe, __import__("pathlib").Path("/tmp/x"), "cpu", cpu_dtype(), measuring=False)
    assert args.neftune_noise_alpha == 5


def test_pissa_and_impossible_combinations_are_refused_before_loading(tmp_path, monkeypatch):
    import qlora_phi3.model.load as load
    from qlora_phi3.run.train import train

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for overrides, message in ((["lora.init=pissa"], "lora.init=olora"),
                               (["lora.init=olora", "lora.use_dora=true"], "use one of the two")):
        recipe = load_recipe("tiny_cpu", [f"train.output_dir={tmp_path / 'r'}", *overrides])
        with pytest.raises(UserError, match=message):
            train(recipe)
    with pytest.raises(UserError, match="lora.init"):
        load_recipe("tiny_cpu", ["lora.init=corda"])


def test_loftq_adapter_starts_as_the_fit_of_the_quantization_error():
    """At step 0, 4-bit base + LoftQ adapter is closer to the 16-bit weights than the 4-bit base alone (with the
    LoRA scaling alpha/r = 2 of the tiny recipe: an adapter not divided by it would overshoot)."""
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import Linear4bit
    from safetensors.torch import load_file

    from qlora_phi3.model.load import load_model
    from qlora_phi3.model.lora import attach_lora
    from qlora_phi3.model.tiny import TINY_MODEL_DIR

    recipe = load_recipe("tiny_cpu", ["lora.init=loftq"])
    assert recipe.lora.alpha / recipe.lora.r == 2
    model = attach_lora(load_model(recipe.model, "cpu", cpu_dtype(), "sdpa"), recipe.lora, recipe.model)
    w16 = load_file(str(TINY_MODEL_DIR / "model.safetensors"))
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            weight = module.get_base_layer().weight
            q = dequantize_4bit(weight.data, weight.quant_state).float()
            w = w16[name.removeprefix("base_model.model.") + ".weight"].float()
            ba = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            assert (w - q - ba).norm() < 0.9 * (w - q).norm(), name
            checked += 1
    assert checked == 4 * len(recipe.lora.target_modules)
