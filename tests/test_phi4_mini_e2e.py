"""Phi-4-mini's shape end to end on its tiny model (grouped KV, partial rotary 0.75, tied embeddings, the 200,064-row
o200k vocabulary): train with assistant-only labels, resume, merge (tied kept, merged = base + adapter), chat stopping
at its own <|end|>, and GGUF f16 / q8_0 that agree with llama.cpp's own converter (and run in llama.cpp when
llama-cpp-python is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

# float32 compute: CPUs without native bf16 emulate it ~10x slower (PITFALLS 21), and the 200,064-wide logits
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
    from qlora_phi3.out.merge import merge

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
    from qlora_phi3.out.chat import load_chat_model, reply

    cm = load_chat_model(str(phi4_merged.out_dir))
    assert cm.stop_ids == [200020, 199999]
    msgs = [{"role": "user", "content": "Hi"}]
    assert cm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|user|>Hi<|end|><|assistant|>"
    for emitted, stops in ((200020, True), (12194, False)):
        head = torch.nn.Linear(cm.model.config.hidden_size, 200064, bias=True, dtype=cm.model.lm_head.weight.dtype)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[emitted] = 10.0
        cm.model.lm_head = head
        reply(cm, msgs, max_new_tokens=3, stream=False)
        cut = "without an end-of-turn token" in capsys.readouterr().out
        assert cut is not stops


def _fields(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


@pytest.fixture(scope="module")
def phi4_gguf(phi4_merged, tmp_path_factory):
    from qlora_phi3.out import export as export_mod

    real = export_mod._llama_cpp
    export_mod._llama_cpp = lambda: None  # f16 / q8_0 need only the gguf package; the llama.cpp run is its own test
    try:
        return export_mod.export(str(phi4_merged.out_dir), str(tmp_path_factory.mktemp("phi4_gguf") / "out"),
                                 quants="f16,q8_0")
    finally:
        export_mod._llama_cpp = real


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


def test_gguf_runs_in_llama_cpp_with_the_merged_models_predictions(phi4_merged, tmp_path):
    """f16 and q8_0 run in llama.cpp: the same token ids as transformers on chat text (no Phi-3 rstrip, no <s>) and
    the merged model's top-1 predictions. The tiny model trained 15 steps does not answer or stop yet, so the
    export's own pass mark (99% top-1, every prompt stopping at <|end|>) is not asked of it: the report's numbers are."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'qlora-phi3[gguf]')")
    from qlora_phi3.out.export import CheckFailed, export

    out = tmp_path / "checked"
    try:
        export(str(phi4_merged.out_dir), str(out), quants="f16,q8_0", check=True, check_samples=4)
    except CheckFailed:
        pass
    report = json.loads((out / "export_report.json").read_text())
    for quant, top1_min in (("f16", 0.95), ("q8_0", 0.9)):
        check = report["files"][quant]["check"]
        assert check["token_ids_equal"] == check["conversations"] == 4, check
        assert check["top1_agreement"] >= top1_min, check
        assert check["eog_tokens"] == {"<|end|>": True, "<|endoftext|>": True}, check


def test_k_quant_export_runs_in_llama_cpp(phi4_merged, tmp_path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'qlora-phi3[gguf]')")
    from qlora_phi3.out import export as export_mod

    result = export_mod.export(str(phi4_merged.out_dir), str(tmp_path / "k"), quants="q4_k_m", check=False)
    reader, kv = _fields(result.files["q4_k_m"])
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_K" in kinds and kv["tokenizer.ggml.pre"] == "gpt-4o" and kv["phi3.rope.dimension_count"] == 12
