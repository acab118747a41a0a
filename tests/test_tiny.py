"""The embedded tiny Phi-3: real architecture, Phi-3 tokens and template, rebuilt bit for bit."""

import json

import torch
from safetensors.torch import load_file

from qlora_phi3.model.tiny import PHI3_CHAT_TEMPLATE, PHI3_SPECIAL_TOKENS, TINY_MODEL_DIR, build_tiny


def test_shipped_tiny_model_is_phi3():
    cfg = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["architectures"] == ["Phi3ForCausalLM"]
    assert "auto_map" not in cfg  # native class, no remote code
    names = load_file(TINY_MODEL_DIR / "model.safetensors").keys()
    assert any(n.endswith("self_attn.qkv_proj.weight") for n in names)
    assert any(n.endswith("mlp.gate_up_proj.weight") for n in names)


def test_tokenizer_has_phi3_tokens_and_template(tiny_tokenizer):
    for t in PHI3_SPECIAL_TOKENS:
        assert tiny_tokenizer.convert_tokens_to_ids(t) != tiny_tokenizer.unk_token_id
    assert tiny_tokenizer.chat_template == PHI3_CHAT_TEMPLATE
    assert tiny_tokenizer.pad_token == "<unk>" != tiny_tokenizer.eos_token
    text = "Héllo wörld, 日本語!\n\ttabs"
    assert tiny_tokenizer.decode(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_rebuild_is_deterministic(tmp_path):
    build_tiny(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (TINY_MODEL_DIR / "tokenizer.json").read_text()
    new, shipped = load_file(tmp_path / "model.safetensors"), load_file(TINY_MODEL_DIR / "model.safetensors")
    assert new.keys() == shipped.keys()
    for k in new:
        assert torch.equal(new[k], shipped[k]), k
