"""Phi-4-mini's shape end to end on its tiny model (grouped KV, partial rotary 0.75, tied embeddings, the 200,064-row
o200k vocabulary): train with assistant-only labels, resume, merge (tied kept, merged = base + adapter), chat stopping
at its own <|end|>, and GGUF f16 / q8_0 that agree with llama.cpp's own converter. Then the GGUF proof of every tiny
shape that is not Phi-3-mini's, one parametrized test each: Phi-4-mini, Phi-3-medium (grouped KV 4:1, as 40:10) and
Phi-3.5-mini (longrope with its own published factors), trained a few steps through `train`, merged, exported by
`qlora-phi3 export` and run in llama.cpp with the merged model's predictions."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import read_gguf

pytestmark = pytest.mark.slow

# float32 compute: CPUs without native bf16 emulate it ~10x slower (docs/pitfalls.md), and the 200,064-wide logits
# dominate a tiny model's step.
FAST = ["model.compute_dtype=float32", "train.max_steps=12", "train.save_steps=6", "train.eval_steps=6",
        "train.logging_steps=3", "data.max_samples=120", "data.max_eval_samples=8", "train.micro_batch_size=2",
        "train.sample_prompts=1", "train.sample_max_new_tokens=4"]


@pytest.fixture(scope="module")
def phi4_run(tiny_phi4_mini_dir, tmp_path_factory):
    from qlora_phi3.config import load_recipe
    from qlora_phi3.run.train import train
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    out = tmp_path_factory.mktemp("phi4_run") / "run"
    model = f"model.name_or_path={tiny_phi4_mini_dir}"
    first = train(load_recipe("tiny_cpu", [model, f"train.output_dir={out}", *FAST]))
    resumed = train(load_recipe("tiny_cpu", [model, f"train.output_dir={out}", *FAST, "train.max_steps=15"]),
                    resume=True)
    return first, resumed


@pytest.fixture(scope="module")
def phi4_merged(phi4_run, tmp_path_factory):
    from qlora_phi3.ship.merge import merge

    _, resumed = phi4_run
    return merge(str(resumed.output_dir), str(tmp_path_factory.mktemp("phi4_merge") / "phi4-tiny-merged"),
                 report_samples=2)


def test_trains_with_exact_labels_and_resumes(phi4_run, phi4_tokenizer):
    from qlora_phi3.data.encode import encode_conversation
    from qlora_phi3.phi3 import IGNORE_INDEX

    first, resumed = phi4_run
    assert first.run["status"] == "completed" and first.run["steps"] == 12
    assert first.run["eval_loss_end"] < 0.7 * first.run["eval_loss_start"]  # it learns through the tied head
    assert resumed.run["steps"] == 15 and resumed.run["resumes"][0]["from"] == "checkpoint-12"
    # The labels the run trained on: exactly each reply and its own <|end|> (200020), on Phi-4-mini's ids.
    msgs = [{"role": "user", "content": "What is 7 plus 7?"}, {"role": "assistant", "content": "7 plus 7 is 14."}]
    ids, labels = encode_conversation(phi4_tokenizer, msgs)
    assert phi4_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "7 plus 7 is 14.<|end|>"
    # Only LoRA was trained: the tied matrix is untouched and still one matrix.
    model = resumed.model.get_base_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.requires_grad for n, p in resumed.model.named_parameters() if "lora_" not in n)


def test_lora_on_the_tied_head_is_refused_with_the_reason(tiny_phi4_mini_dir):
    from transformers import AutoModelForCausalLM

    from qlora_phi3.config import LoraSettings
    from qlora_phi3.errors import UserError
    from qlora_phi3.model.lora import attach_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi4_mini_dir))
    for target in ("lm_head", "embed_tokens"):
        with pytest.raises(UserError, match="ties its input embeddings and output head") as err:
            attach_lora(model, LoraSettings(target_modules=["qkv_proj", target]))
        assert f"remove '{target}'" in str(err.value)


def test_merge_keeps_one_tied_matrix_and_equals_base_plus_adapter(phi4_merged):
    from safetensors import safe_open

    out = phi4_merged.out_dir
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 200064
    names = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    report = phi4_merged.report
    assert report["merge_rounding_b_vs_c"]["max_abs_logit_diff"] < 0.1  # (b) merged == (c) 16-bit base + adapter
    assert report["models"]["b"]["max_abs_logit_diff"] > 0.0
    gen = json.loads((out / "generation_config.json").read_text())
    assert {199999, 200020} <= set(gen["eos_token_id"])
    card = (out / "README.md").read_text()
    assert "Phi-3" not in card.split("---")[1]  # llama.cpp would apply Phi-3's rstrip to a name saying Phi-3


def test_chat_stops_at_phi4_minis_own_end(phi4_merged, capsys):
    from qlora_phi3.ship.chat import load_chat_model

    cm = load_chat_model(str(phi4_merged.out_dir))
    assert cm.stop_ids == [200020, 199999]
    msgs = [{"role": "user", "content": "Hi"}]
    assert cm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|user|>Hi<|end|><|assistant|>"
    assert _chat_stops(cm, msgs, 200020, capsys) and not _chat_stops(cm, msgs, 12194, capsys)


def _chat_stops(cm, msgs, emitted: int, capsys) -> bool:
    """Whether chat ends its reply on a stop token when the model's head always emits ``emitted``."""
    from qlora_phi3.ship.chat import reply

    head = torch.nn.Linear(cm.model.config.hidden_size, cm.model.config.vocab_size, bias=True,
                           dtype=cm.model.lm_head.weight.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[emitted] = 10.0
    cm.model.lm_head = head
    reply(cm, msgs, max_new_tokens=3, stream=False)
    return "without an end-of-turn token" not in capsys.readouterr().out


@functools.cache
def _fields(path: Path):
    """The file's reader and its keys (conftest.read_gguf), parsed once per file: several tests read the same f16
    file, and reading one with the 200,064-token vocabulary and its 446,000 merges takes seconds."""
    return read_gguf(path)


CHECK_SAMPLES = 4  # held-out conversations per llama.cpp check, as tests/unit/ship/test_export.py


def _export(merged_dir: Path, out: Path, quants: str = "f16,q8_0", samples: int = CHECK_SAMPLES):
    """`qlora-phi3 export MERGED --quant f16,q8_0` as a user runs it: checked in llama.cpp when llama-cpp-python is
    installed. Models trained a few steps do not end their turns yet, so the check's own pass mark fails on stopping
    (exit 3): the files and the report are published all the same, and the tests read the report's numbers."""
    from qlora_phi3.cli import main
    from qlora_phi3.ship.export import REPORT_NAME, CheckFailed

    code = main(["export", str(merged_dir), "--out", str(out), "--quant", quants,
                 "--check-samples", str(samples)])
    assert code in (0, CheckFailed.exit_code), code
    report = json.loads((out / REPORT_NAME).read_text())
    files = {q: out / row["file"] for q, row in report["files"].items()}
    return SimpleNamespace(out_dir=out, report=report, files=files)


@pytest.fixture(scope="module")
def phi4_gguf(phi4_merged, tmp_path_factory):
    # q4_k_m too: llama.cpp quantizes it from the same f16 file (a K-quant export of its own writes the f16 again).
    return _export(phi4_merged.out_dir, tmp_path_factory.mktemp("phi4_gguf") / "out", "f16,q8_0,q4_k_m")


def test_gguf_has_partial_rotary_tied_head_and_the_o200k_vocabulary(phi4_gguf, phi4_merged, phi4_tokenizer):
    import gguf
    from safetensors.torch import load_file

    weights = {}
    for shard in phi4_merged.out_dir.glob("*.safetensors"):
        weights.update(load_file(str(shard)))
    modelfile = (phi4_gguf.out_dir / "Modelfile").read_text()
    assert "<|{{ .Role }}|>{{ .Content }}<|end|>" in modelfile  # no newlines, as Phi-4-mini's template
    for quant, tol in (("f16", 0.0), ("q8_0", 1 / 127)):
        reader, kv = _fields(phi4_gguf.files[quant])
        assert kv["phi3.rope.dimension_count"] == 12  # 0.75 of head dim 16: partial rotary kept
        assert kv["phi3.attention.head_count_kv"] == 2 and kv["phi3.attention.head_count"] == 6
        assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-4o"
        assert "phi3" not in kv["general.name"].lower().replace(" ", "")
        tokens = kv["tokenizer.ggml.tokens"]
        assert len(tokens) == 200064 and tokens[200020] == "<|end|>" and tokens[199999] == "<|endoftext|>"
        assert tokens[200040] == "[PAD200040]"
        assert len(kv["tokenizer.ggml.merges"]) > 300_000
        assert kv["tokenizer.ggml.eos_token_id"] == 199999 and kv["tokenizer.ggml.eot_token_id"] == 200020
        assert kv["tokenizer.ggml.add_bos_token"] is False
        tensors = {t.name: t for t in reader.tensors}
        assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd for the head
        assert len(tensors[("rope_factors_long.weight")].data) == 6
        want = weights["model.embed_tokens.weight"].float().numpy()
        t = tensors["token_embd.weight"]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.abs(got - want).max() <= tol * np.abs(want).max() + 1e-7


def test_our_gguf_equals_llama_cpps_converter(phi4_gguf, phi4_merged, llama_cpp_src, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py on the merged directory: it recognises the tokenizer as gpt-4o (from the ids
    of its probe text) and writes the same keys, vocabulary and tensors as our writer."""
    converted = tmp_path / "converted-f16.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = subprocess.run([sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(phi4_merged.out_dir),
                           "--outfile", str(converted), "--outtype", "f16"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs_reader, theirs = _fields(converted)
    ours_reader, ours = _fields(phi4_gguf.files["f16"])
    for key in ("phi3.rope.dimension_count", "phi3.attention.head_count_kv", "phi3.context_length",
                "phi3.rope.scaling.original_context_length", "phi3.attention.sliding_window",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert ours[key] == theirs[key], key
    assert ours["phi3.rope.scaling.attn_factor"] == pytest.approx(theirs["phi3.rope.scaling.attn_factor"])
    a = {t.name: np.asarray(t.data) for t in ours_reader.tensors}
    b = {t.name: np.asarray(t.data) for t in theirs_reader.tensors}
    assert a.keys() == b.keys() and "output.weight" not in a
    for name in a:
        assert np.array_equal(a[name].astype(np.float32), b[name].astype(np.float32)), name


# ------------------------------------------------------------------------------- each tiny shape in llama.cpp

# Few steps: enough for the adapter to move the model (eval loss 16.3 -> 13.6 on Phi-3-medium, 32.7 -> 24.2 on
# Phi-3.5-mini, measured), so the merged weights, not the base's, are what llama.cpp must reproduce; not enough to
# answer or stop.
SHAPE_STEPS = ["model.compute_dtype=float32", "train.max_steps=3", "train.save_steps=3", "train.eval_steps=0",
               "data.max_samples=40", "data.max_eval_samples=4", "train.sample_prompts=1",
               "train.sample_max_new_tokens=2"]
SHAPES = ("phi4-mini", "phi3-medium", "phi3.5-mini")


@pytest.fixture(scope="module", params=SHAPES)
def shape_merged(request, tmp_path_factory):
    """(shape, run, merge) of each tiny shape: Phi-4-mini's is the run above (trained and resumed); the others are
    built, trained a few steps through `train` and merged here."""
    if request.param == "phi4-mini":
        return request.param, request.getfixturevalue("phi4_run")[1], request.getfixturevalue("phi4_merged")
    from qlora_phi3.config import load_recipe
    from qlora_phi3.model.tiny import build_tiny_shape
    from qlora_phi3.ship.merge import merge
    from qlora_phi3.run.train import train

    root = tmp_path_factory.mktemp(request.param)
    model_dir = build_tiny_shape(request.param, root / f"tiny-{request.param}")
    run = train(load_recipe("tiny_cpu", [f"model.name_or_path={model_dir}", f"train.output_dir={root / 'run'}",
                                         *SHAPE_STEPS]))
    return request.param, run, merge(str(run.output_dir), str(root / "merged"), report_samples=2)


@pytest.fixture(scope="module")
def shape_gguf(shape_merged, request, tmp_path_factory):
    shape, _, merged = shape_merged
    if shape == "phi4-mini":
        return request.getfixturevalue("phi4_gguf")
    return _export(merged.out_dir, tmp_path_factory.mktemp(f"{shape}_gguf") / "out")


def test_each_shape_trains_and_merges_to_base_plus_adapter(shape_merged):
    """The adapter's fused qkv_proj is as wide as the model's own (query heads + 2 x KV heads: grouped KV is
    narrower than 3 x hidden), the run moved the model, and merged = base + adapter in 16 bits."""
    from safetensors import safe_open

    shape, run, merged = shape_merged
    config = json.loads((merged.out_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    with safe_open(str(run.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if "qkv_proj.lora_B" in k)
        width = f.get_slice(key).get_shape()[0]
    assert width == (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    if config["num_key_value_heads"] < config["num_attention_heads"]:
        assert width < 3 * config["hidden_size"]
    assert run.run["status"] == "completed" and run.run["eval_loss_end"] < run.run["eval_loss_start"] - 1
    assert merged.report["merge_rounding_b_vs_c"]["max_abs_logit_diff"] < 0.1


def test_each_shapes_gguf_carries_its_attention_and_rope(shape_merged, shape_gguf):
    """Read back from the f16 file: the KV heads, rotary dims, context, the head (tied or not) and, for longrope,
    the config's factors (Phi-3.5-mini's 48 published pairs verbatim) and the attention factor llama.cpp applies."""
    _, _, merged = shape_merged
    config = json.loads((merged.out_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    reader, kv = _fields(shape_gguf.files["f16"])
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert kv["phi3.attention.head_count"] == config["num_attention_heads"]
    assert kv["phi3.attention.head_count_kv"] == config["num_key_value_heads"]
    assert kv["phi3.rope.dimension_count"] == int(head_dim * rope.get("partial_rotary_factor", 1.0))
    assert kv["phi3.context_length"] == config["max_position_embeddings"]
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert ("output.weight" in tensors) is not config["tie_word_embeddings"]
    if rope.get("rope_type") == "longrope":
        assert np.array_equal(tensors["rope_factors_long.weight"], np.float32(rope["long_factor"]))
        assert np.array_equal(tensors["rope_factors_short.weight"], np.float32(rope["short_factor"]))
        scale = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx(
            (1 + np.log(scale) / np.log(rope["original_max_position_embeddings"])) ** 0.5)


# The bar of tests/unit/ship/test_export.py's Phi-3-mini check (token ids equal on every conversation, both turn ends end
# generation, top-1 agreement >= the export's 99% floor) on models trained a few steps, whose answer positions hold
# near-ties (the merged model's top-1 leads by under 0.05 logit at about 5% of them) that rounding alone swaps: top-1
# counts those apart (llama_check.NEAR_TIE_LOGITS). The logits prove more: f16 within 0.05 of the merged model's at every
# answer position (measured 0.004-0.012), where ignoring Phi-3.5-mini's short factors gives 1.1, a wrong attention
# factor 2.4, full instead of partial rotary on Phi-4-mini 3.5 (measured; none of them moves top-1 past the near-ties
# of so undertrained a model).
LOGIT_TOLERANCE = {"f16": 0.05, "q8_0": 1.0}  # q8_0: 0.17-0.35 here, 0.63 on the tiny Phi-3 trained 300 steps


def test_gguf_runs_in_llama_cpp_with_the_merged_models_predictions(shape_gguf, llama_cpp):
    """f16 and q8_0 run in llama.cpp: the same token ids as transformers on chat text (Phi-4-mini: no Phi-3 rstrip,
    no <s>), the merged model's logits within rounding, and its top-1 predictions. The tiny models do not answer
    or stop yet, so the export's stop check is not asked of them (their files do end generation on <|end|>)."""
    from qlora_phi3.ship.export import QUANTS

    report = shape_gguf.report
    assert report["checked"] and report["reference"]["conversations"] == CHECK_SAMPLES
    for quant, tolerance in LOGIT_TOLERANCE.items():
        check = report["files"][quant]["check"]
        assert check["token_ids_equal"] == check["conversations"] == CHECK_SAMPLES, check
        assert check["eog_tokens"] == {"<|end|>": True, "<|endoftext|>": True}, check
        assert check["max_abs_logit_diff"] < tolerance, check
        assert check["top1_agreement_except_near_ties"] >= QUANTS[quant].top1_min, check
        top1_failed = [p for p in check["problems"] if p.startswith("top-1")]
        if check["near_tie_flips"] and top1_failed:  # more flips than the sample explains: the failure says why
            assert f"{check['near_tie_flips']} of the" in top1_failed[0], check


def test_k_quant_export_runs_in_llama_cpp(phi4_gguf, llama_cpp):
    check = phi4_gguf.report["files"]["q4_k_m"]["check"]  # checked in llama.cpp beside f16 and q8_0
    assert check["token_ids_equal"] == check["conversations"] == CHECK_SAMPLES, check
    assert check["eog_tokens"] == {"<|end|>": True, "<|endoftext|>": True}, check
    reader, kv = _fields(phi4_gguf.files["q4_k_m"])
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_K" in kinds and kv["tokenizer.ggml.pre"] == "gpt-4o" and kv["phi3.rope.dimension_count"] == 12
