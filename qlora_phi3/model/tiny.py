"""The embedded tiny Phi-3: the real Phi-3 tokenizer, a mini Phi-3-mini-4k-instruct config, random weights.

It lets every command run offline on a CPU through the same code path as the real model: it is an
ordinary Hugging Face model directory (safetensors, ``config.json`` with ``model_type: phi3`` and every
field of Phi-3-mini-4k-instruct's except the sizes, Phi-3's own tokenizer and chat template) loaded by
``from_pretrained`` like ``microsoft/Phi-3-mini-4k-instruct``. Why the real tokenizer: labels, stops and
renders depend on its details (``rstrip`` after the role tokens, the ``▁`` prefix, byte fallback), so only
tests on it say what users get. Why random weights: there are no Phi-3 weights offline, and a tiny random
base that LoRA can teach the bundled synthetic tasks shows the whole pipeline working in a minute.

The tokenizer files are rebuilt by ``python -m qlora_phi3.model.tokenizer`` (from llama.cpp's copy of the
Phi-3 vocabulary); the weights by ``python -m qlora_phi3.model.tiny [OUT]`` (seeded, bit for bit:
``tests/unit/model/test_tiny.py`` checks the rebuild matches what ships).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from qlora_phi3.data.read import PHI3_TOKEN_TEXTS
from qlora_phi3.family import (PHI3_CHAT_TEMPLATE, PHI35_MINI_LONG_FACTOR, PHI35_MINI_SHORT_FACTOR, PHI4_MINI,
                               PUBLISHED, TokenizerFamily)

__all__ = ["PHI3_CHAT_TEMPLATE", "PHI3_MINI_4K", "PHI3_MINI_128K", "PHI3_SPECIAL_TOKENS", "TINY_MODEL_DIR",
           "TINY_SHAPES", "TINY_SIZES", "TOKENIZER_FILES", "build_tiny", "build_tiny_shape", "mini_config",
           "mini_phi3_config"]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TINY_MODEL_DIR = ASSETS_DIR / "tiny-phi3"
MODEL_MAX_LENGTH = 4096  # Phi-3-mini-4k-instruct's tokenizer_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")

# Phi-3's chat tokens, ids 32000..32010.
PHI3_SPECIAL_TOKENS = list(PHI3_TOKEN_TEXTS[3:])

# microsoft/Phi-3-mini-4k-instruct config.json, every field but the sizes (which TINY_SIZES or the caller give).
PHI3_MINI_4K = dict(
    architectures=["Phi3ForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=1, embd_pdrop=0.0,
    eos_token_id=32000, hidden_act="silu", initializer_range=0.02, max_position_embeddings=4096, model_type="phi3",
    original_max_position_embeddings=4096, pad_token_id=32000, resid_pdrop=0.0, rms_norm_eps=1e-05,
    rope_scaling=None, rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False, use_cache=True,
    vocab_size=32064,
)
# microsoft/Phi-3-mini-128k-instruct config.json: the 4k fields with longrope to 131072 positions (with Phi-3.5-mini's
# published factors, the same layout: family.py). A mini config with another head dim than 96 cannot use them and
# gets the same curves resampled to head_dim / 2 points.
PHI3_MINI_128K = dict(
    PHI3_MINI_4K, max_position_embeddings=131072, sliding_window=262144,
    rope_scaling={"type": "longrope", "long_factor": PHI35_MINI_LONG_FACTOR, "short_factor": PHI35_MINI_SHORT_FACTOR},
)

# The embedded model's sizes (the only fields that differ from Phi-3-mini-4k-instruct's config.json).
# Hidden 64 keeps the two 32064-row matrices (embedding, lm_head) at 8 MB in bf16, most of the package; the layers
# cost 82 KB each, so there are 4 (measured, 300 steps: 4 layers reach eval loss 0.12, 2 layers 1.16).
TINY_SIZES = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4)


def _resample(factors: list[float], n: int) -> list[float]:
    """``factors`` (a curve over the rotary frequencies) linearly resampled to ``n`` points."""
    if n == len(factors):
        return list(factors)
    step = (len(factors) - 1) / max(1, n - 1)
    out = []
    for i in range(n):
        x = i * step
        lo = int(x)
        hi = min(lo + 1, len(factors) - 1)
        out.append(factors[lo] + (factors[hi] - factors[lo]) * (x - lo))
    return out


def mini_phi3_config(kind: str = "4k", **sizes):
    """A ``Phi3Config`` with every field of Phi-3-mini-``kind``-instruct's config.json and tiny ``sizes``."""
    from transformers import Phi3Config

    fields = json.loads(json.dumps(PHI3_MINI_4K if kind == "4k" else PHI3_MINI_128K))  # deep copy
    fields.update(TINY_SIZES if not sizes else sizes)
    if fields["rope_scaling"]:
        half = fields["hidden_size"] // fields["num_attention_heads"] // 2
        for key in ("long_factor", "short_factor"):
            fields["rope_scaling"][key] = _resample(fields["rope_scaling"][key], half)
    return Phi3Config(**fields)


def _init_weights(model, seed: int) -> None:
    """Seeded weights for a frozen random base that LoRA can teach within a minute.

    Written out rather than left to ``from_pretrained``'s initialisation, so that the shipped bytes do not
    depend on how a transformers version initialises. The choices: unit-scale embeddings; projections of
    std 1/sqrt(fan_in); a quiet residual stream (o_proj / down_proj 20x smaller, as GPT-2 scales them); and a
    confident lm_head (std 0.5): with 32064 frozen random output rows and a 64-wide hidden state, a smaller
    head could not make any one token much likelier than the rest however LoRA steers the hidden state.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            fan_in = param.shape[-1]
            if "embed_tokens" in name:
                # Tied (Phi-4-mini): also the output head (named_parameters lists the one matrix once), so scaled
                # like lm_head: logits of std ~4 over the normed hidden state, not ~sqrt(hidden).
                std = 0.4 if model.config.tie_word_embeddings else 1.0
            elif name == "lm_head.weight":
                std = 0.5
            else:
                std = fan_in ** -0.5 * (0.05 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def _generation_config(cls, family: TokenizerFamily):
    """The published generation_config.json of the family (family.py: its bos, eos and pad tokens), e.g.
    Phi-3-mini-4k-instruct's stops at <|endoftext|>, <|assistant|> and <|end|>."""
    return cls(bos_token_id=family.token_id(family.bos_token),
               eos_token_id=[family.token_id(t) for t in family.generation_eos],
               pad_token_id=family.token_id(family.generation_pad))


def build_model_dir(out_dir: Path, config, seed: int = 0, tokenizer_dir: Path = TINY_MODEL_DIR,
                    device: str = "cpu") -> Path:
    """A Phi model directory: ``config`` with seeded random bf16 weights and its family's tokenizer (the shipped
    Phi-3 one, or Phi-4-mini's rebuilt from o200k when the config has its 200,064-row vocabulary).

    The model is built in bf16 on ``device`` (in fp32 full-size Phi-3-mini would need 15 GB before the cast)."""
    from qlora_phi3.family import family_for_config

    family = family_for_config(config)
    import torch
    from transformers import GenerationConfig, Phi3ForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    _init_weights(model, seed)
    model.generation_config = _generation_config(GenerationConfig, family)
    model.save_pretrained(out_dir, safe_serialization=True)
    if family is PHI4_MINI:
        from qlora_phi3.model.o200k import write_phi4_mini_tokenizer

        write_phi4_mini_tokenizer(out_dir, model_max_length=config.max_position_embeddings)
    elif Path(tokenizer_dir).resolve() != out_dir.resolve():
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
        if config.max_position_embeddings != MODEL_MAX_LENGTH:  # the 128k tokenizer says 131072
            path = out_dir / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "model_max_length":
                                        config.max_position_embeddings}, indent=2) + "\n")
    return out_dir


# Tiny versions of the other published shapes, each keeping what makes its shape different (built on the fly in
# tests, never shipped: the Phi-4-mini one has a 200,064-row embedding, 38 MB in bf16).
# phi4-mini: grouped-query attention 6 / 2 (Phi-4-mini's 24 / 8 ratio), head dim 16 so that partial rotary 0.75
#   covers 12 dims (6 longrope pairs, its published factors resampled), tied embeddings, the 200,064 vocabulary.
# phi3-medium: grouped-query attention 4 / 1 (Phi-3-medium's 40 / 10 ratio), head dim 16, untied, Phi-3's vocabulary.
# phi3.5-mini: longrope to 131072 positions with Phi-3.5-mini's own factors verbatim: head dim 96 as published (2 heads
#   of 96), so its 48 long and 48 short factors need no resampling; full rotary, untied, Phi-3's vocabulary.
TINY_SHAPES = {
    "phi4-mini": ("microsoft/Phi-4-mini-instruct",
                  dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2)),
    "phi3-medium": ("microsoft/Phi-3-medium-4k-instruct",
                    dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1)),
    "phi3.5-mini": ("microsoft/Phi-3.5-mini-instruct",
                    dict(hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2)),
}


def mini_config(hub_id: str, **sizes):
    """A ``Phi3Config`` with the published fields of ``hub_id`` (family.PUBLISHED) and tiny ``sizes``; longrope
    factors resampled to the tiny model's rotary pairs."""
    from transformers import Phi3Config

    fields = json.loads(json.dumps(PUBLISHED[hub_id].config))  # deep copy
    fields.update(sizes)
    rope_type = fields.pop("rope_type", None)
    long_f, short_f = fields.pop("long_factor", None), fields.pop("short_factor", None)
    if rope_type == "longrope":
        if long_f is None:  # the Phi-3 128k models: Phi-3.5-mini's published curve (same architecture)
            long_f, short_f = PHI35_MINI_LONG_FACTOR, PHI35_MINI_SHORT_FACTOR
        head_dim = fields["hidden_size"] // fields["num_attention_heads"]
        half = int(head_dim * fields.get("partial_rotary_factor", 1.0)) // 2
        fields["rope_scaling"] = {"type": "longrope", "long_factor": _resample(long_f, half),
                                  "short_factor": _resample(short_f, half)}
    return Phi3Config(**fields)


def build_tiny_shape(shape: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny model of ``shape`` (a key of TINY_SHAPES) into ``out_dir``, seeded, with its tokenizer."""
    hub_id, sizes = TINY_SHAPES[shape]
    return build_model_dir(out_dir, mini_config(hub_id, **sizes), seed)


def build_tiny(out_dir: Path, seed: int = 0) -> Path:
    """Build the embedded tiny Phi-3 into ``out_dir`` (the tokenizer files come from the shipped directory)."""
    return build_model_dir(out_dir, mini_phi3_config("4k"), seed)


def write_random_phi3(out_dir: Path, seed: int = 0, device: str = "cpu", kind: str = "4k", **sizes) -> Path:
    """Phi-3-mini-``kind`` (every published config field) with the given ``sizes`` and seeded random weights,
    saved like a Hub model with the shipped tokenizer: the tiny model's recipe at any size. For memory and
    speed measurements, which depend on shapes, not on trained values (``device="cuda"`` builds full-size
    Phi-3-mini in bf16 on the GPU in seconds)."""
    return build_model_dir(out_dir, mini_phi3_config(kind, **{**TINY_SIZES, **sizes}), seed, device=device)


if __name__ == "__main__":  # pragma: no cover - regeneration entry point
    # python -m qlora_phi3.model.tiny [OUT]: the embedded tiny Phi-3; [--shape SHAPE OUT]: another (TINY_SHAPES).
    if len(sys.argv) > 2 and sys.argv[1] == "--shape":
        print(build_tiny_shape(sys.argv[2], Path(sys.argv[3])))
    else:
        print(build_tiny(Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_MODEL_DIR))
