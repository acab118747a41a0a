"""LoRA targets: an unmatched name is an error naming the fused module; the coverage table is right."""

import pytest

from conftest import cpu_dtype
from qlora_phi3.config import LoraSettings, ModelConfig
from qlora_phi3.errors import UserError
from qlora_phi3.model.lora import attach_lora, coverage
from qlora_phi3.model.load import load_model


@pytest.fixture(scope="module")
def base():
    return load_model(ModelConfig(), "cpu", cpu_dtype(), "sdpa")


def test_llama_names_are_rejected_with_the_fused_name(base):
    with pytest.raises(UserError) as e:
        attach_lora(base, LoraSettings(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"]))
    msg = str(e.value)
    assert "'q_proj' matches nothing: Phi-3 fuses it into 'qkv_proj'" in msg
    assert "'gate_proj' matches nothing: Phi-3 fuses it into 'gate_up_proj'" in msg


def test_typo_gets_a_suggestion(base):
    with pytest.raises(UserError, match="'down_prj' matches no module.*did you mean 'down_proj'"):
        attach_lora(base, LoraSettings(target_modules=["down_prj"]))


def test_coverage_counts_every_layer_and_parameter():
    model = load_model(ModelConfig(), "cpu", cpu_dtype(), "sdpa")
    cfg = model.config
    peft_model = attach_lora(model, LoraSettings(r=8))
    rows = {r.target: r for r in coverage(peft_model, LoraSettings().target_modules)}
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkv_out = h + 2 * cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    expected = {"qkv_proj": 8 * (h + qkv_out), "o_proj": 8 * (h + h), "gate_up_proj": 8 * (h + 2 * i),
                "down_proj": 8 * (i + h)}
    for target, per_layer in expected.items():
        assert rows[target].layers_adapted == n
        assert rows[target].trainable_params == n * per_layer
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == sum(r.trainable_params for r in rows.values())
