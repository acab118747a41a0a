"""The embedded tiny Phi-3: a mini Phi-3-mini-4k-instruct (published config fields, tiny sizes), the real Phi-3
tokenizer and template, rebuilt bit for bit; the mini 128k config carries longrope as published."""

import json

import torch
from safetensors.torch import load_file

from qlora_phi3.model.tiny import (
    PHI3_CHAT_TEMPLATE, PHI3_MINI_4K, PHI3_SPECIAL_TOKENS, TINY_MODEL_DIR, TINY_SIZES, build_tiny, mini_phi3_config)


def test_shipped_tiny_model_is_a_mini_phi3_mini_4k():
    cfg = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["architectures"] == ["Phi3ForCausalLM"]
    assert "auto_map" not in cfg  # native class, no remote code
    for key, value in PHI3_MINI_4K.items():  # every published field but the sizes
        if key not in ("rope_scaling", "rope_theta"):  # transformers 5 writes these as rope_parameters
            assert cfg[key] == value, key
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    assert {k: cfg[k] for k in TINY_SIZES} == TINY_SIZES
    assert (cfg["vocab_size"], cfg["eos_token_id"], cfg["bos_token_id"], cfg["sliding_window"]) == (32064, 32000, 1, 2047)
    names = load_file(TINY_MODEL_DIR / "model.safetensors").keys()
    assert any(n.endswith("self_attn.qkv_proj.weight") for n in names)
    assert any(n.endswith("mlp.gate_up_proj.weight") for n in names)
    gen = json.loads((TINY_MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [32000, 32001, 32007] and gen["pad_token_id"] == 32000  # as Phi-3's


def test_tokenizer_has_phi3_tokens_and_template(tiny_tokenizer):
    assert [tiny_tokenizer.convert_tokens_to_ids(t) for t in PHI3_SPECIAL_TOKENS] == list(range(32000, 32011))
    assert tiny_tokenizer.chat_template == PHI3_CHAT_TEMPLATE
    assert tiny_tokenizer.pad_token == "<unk>" != tiny_tokenizer.eos_token == "<|endoftext|>"


def test_rebuild_is_deterministic(tmp_path):
    build_tiny(tmp_path)
    for name in ("tokenizer.json", "tokenizer.model"):
        assert (tmp_path / name).read_bytes() == (TINY_MODEL_DIR / name).read_bytes(), name
    for name in ("config.json", "generation_config.json"):
        # transformers stamps its own version into these: everything but that stamp must be identical.
        new, shipped = (json.loads((d / name).read_text()) for d in (tmp_path, TINY_MODEL_DIR))
        new.pop("transformers_version", None)
        shipped.pop("transformers_version", None)
        assert new == shipped, name
    new, shipped = load_file(tmp_path / "model.safetensors"), load_file(TINY_MODEL_DIR / "model.safetensors")
    assert new.keys() == shipped.keys()
    for k in new:
        assert torch.equal(new[k], shipped[k]), k


def test_mini_128k_config_has_longrope_with_one_factor_per_rotary_pair():
    cfg = mini_phi3_config("128k", hidden_size=192, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)  # head dim 96, as Phi-3-mini
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 4096
    assert cfg.max_position_embeddings == 131072 and cfg.sliding_window == 262144
    assert len(rope["long_factor"]) == len(rope["short_factor"]) == 48  # the published lists, verbatim
    assert rope["long_factor"][0] == 1.0800000429153442 and rope["long_factor"][-1] == 64.83999633789062
    small = mini_phi3_config("128k", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)  # head dim 32: resampled
    lf = small.rope_parameters["long_factor"]
    assert len(lf) == 16 and lf[0] == rope["long_factor"][0] and lf[-1] == rope["long_factor"][-1]
    assert lf == sorted(lf)  # the published curve rises; resampling keeps it so
