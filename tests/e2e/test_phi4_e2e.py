"""Phi-4 (14B)'s shape end to end on its tiny model (grouped KV 4:1, full rotary, untied embeddings, the 100,352-row
cl100k vocabulary, <|im_start|>ROLE<|im_sep|>...<|im_end|>): train a few steps through `train` with labels on each reply
and its <|im_end|>, merge (merged = base + adapter), chat stopping at <|im_end|>, then `qlora-phi3 export` to GGUF f16,
q8_0 and q4_k_m and the adapter as a GGUF LoRA on an f16 base, each run in llama.cpp against the model in transformers.
The helpers (the export as a user runs it, the GGUF reader) are the Phi-4-mini test's."""

from __future__ import annotations

import json

import pytest
from test_phi4_mini_e2e import LOGIT_TOLERANCE, SHAPE_STEPS, _chat_stops, _export, _fields

pytestmark = pytest.mark.slow

CHECK_SAMPLES = 2  # held-out conversations per llama.cpp check: each runs greedy generation on the 100k vocabulary

IM_END, ENDOFTEXT, PAD = 100265, 100257, 100349


@pytest.fixture(scope="module")
def phi4_14b_merged(tiny_phi4_dir, tmp_path_factory):
    """The tiny Phi-4 trained a few steps (6: enough to move the model, not to answer) and merged."""
    from qlora_phi3.config import load_recipe
    from qlora_phi3.ship.merge import merge
    from qlora_phi3.run.train import train
    from qlora_phi3.ui import quiet_library_noise

    quiet_library_noise()
    root = tmp_path_factory.mktemp("phi4_14b")
    run = train(load_recipe("tiny_cpu", [f"model.name_or_path={tiny_phi4_dir}", f"train.output_dir={root / 'run'}",
                                         *SHAPE_STEPS, "train.max_steps=6", "train.save_steps=6"]))
    return run, merge(str(run.output_dir), str(root / "phi4-tiny-merged"), report_samples=2)


def test_trains_on_each_reply_and_merges_to_base_plus_adapter(phi4_14b_merged, phi4_14b_tokenizer):
    from qlora_phi3.data.encode import encode_conversation
    from qlora_phi3.phi3 import IGNORE_INDEX

    run, merged = phi4_14b_merged
    assert run.run["status"] == "completed" and run.run["eval_loss_end"] < run.run["eval_loss_start"] - 1
    msgs = [{"role": "user", "content": "What is 7 plus 7?"}, {"role": "assistant", "content": "7 plus 7 is 14."}]
    ids, labels = encode_conversation(phi4_14b_tokenizer, msgs)
    assert phi4_14b_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "7 plus 7 is 14.<|im_end|>"
    config = json.loads((merged.out_dir / "config.json").read_text())
    assert config["vocab_size"] == 100352 and config["tie_word_embeddings"] is False
    assert config["pad_token_id"] == PAD != config["eos_token_id"]
    assert merged.report["merge_rounding_b_vs_c"]["max_abs_logit_diff"] < 0.1
    gen = json.loads((merged.out_dir / "generation_config.json").read_text())
    assert {IM_END, ENDOFTEXT} <= set(gen["eos_token_id"])
    assert "Phi-3" not in (merged.out_dir / "README.md").read_text().split("---")[1]


def test_chat_renders_phi4s_header_and_stops_at_im_end(phi4_14b_merged, capsys):
    from qlora_phi3.ship.chat import load_chat_model

    cm = load_chat_model(str(phi4_14b_merged[1].out_dir))
    assert cm.stop_ids == [IM_END, ENDOFTEXT]
    msgs = [{"role": "user", "content": "Hi"}]
    assert cm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>"
    # A head that always says <|im_end|> ends the reply; one that always says 'Hello' is cut at the limit.
    assert _chat_stops(cm, msgs, IM_END, capsys) and not _chat_stops(cm, msgs, 9906, capsys)


@pytest.fixture(scope="module")
def phi4_14b_gguf(phi4_14b_merged, tmp_path_factory):
    return _export(phi4_14b_merged[1].out_dir, tmp_path_factory.mktemp("phi4_14b_gguf") / "out", "f16,q8_0,q4_k_m",
                   samples=CHECK_SAMPLES)


def test_gguf_runs_in_llama_cpp_with_phi4s_vocabulary_and_stops(phi4_14b_gguf, llama_cpp):
    """f16, q8_0 and q4_k_m in llama.cpp: the same token ids as transformers on chat text (cl100k's split, which
    llama.cpp calls 'dbrx'), <|im_end|> and <|endoftext|> end generation, and f16 / q8_0 give the merged model's
    logits within rounding."""
    from qlora_phi3.ship.export import QUANTS

    report = phi4_14b_gguf.report
    for quant in ("f16", "q8_0", "q4_k_m"):
        check = report["files"][quant]["check"]
        assert check["token_ids_equal"] == check["conversations"] == CHECK_SAMPLES, check
        assert check["eog_tokens"] == {"<|im_end|>": True, "<|endoftext|>": True}, check
        if quant in LOGIT_TOLERANCE:
            assert check["max_abs_logit_diff"] < LOGIT_TOLERANCE[quant], check
            assert check["top1_agreement_except_near_ties"] >= QUANTS[quant].top1_min, check
    reader, kv = _fields(phi4_14b_gguf.files["f16"])
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "dbrx"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 100352 and tokens[IM_END] == "<|im_end|>" and tokens[100351] == "<|dummy_87|>"
    assert kv["tokenizer.ggml.eos_token_id"] == kv["tokenizer.ggml.eot_token_id"] == IM_END
    assert kv["phi3.attention.head_count_kv"] * 4 == kv["phi3.attention.head_count"]
    assert kv["phi3.rope.dimension_count"] == 16 and kv["phi3.attention.sliding_window"] == 0  # full rotary
    assert "output.weight" in {t.name for t in reader.tensors}  # untied head
    assert "Q4_K" in {t.tensor_type.name for t in _fields(phi4_14b_gguf.files["q4_k_m"])[0].tensors}
    modelfile = (phi4_14b_gguf.out_dir / "Modelfile").read_text()
    assert "<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_lora_on_the_base_runs_in_llama_cpp(phi4_14b_merged, llama_cpp, tmp_path):
    """The adapter as a GGUF LoRA on the f16 base, checked by the export in llama.cpp against base + adapter in
    transformers: same token ids, same top-1 (near-ties of a 6-step model apart)."""
    from qlora_phi3.ship.adapter_export import export_adapter
    from qlora_phi3.ship.export import CheckFailed

    run, _ = phi4_14b_merged
    try:
        result = export_adapter(str(run.output_dir), str(tmp_path / "lora"), quants="f16", base_quant="f16",
                                check=True, check_samples=CHECK_SAMPLES)
    except CheckFailed as e:  # the stop check: a 6-step model does not end its turns yet
        result = e.result
    report = json.loads((result.out_dir / "export_report.json").read_text())
    check = report["files"]["f16"]["check"]
    assert check["token_ids_equal"] == check["conversations"] >= 1, check
    assert check["top1_agreement_except_near_ties"] >= 0.99, check
    assert check["eog_tokens"] == {"<|im_end|>": True, "<|endoftext|>": True}, check
    assert 'PARAMETER stop "<|im_end|>"' in (result.out_dir / "Modelfile").read_text()
