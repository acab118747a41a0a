"""GGUF export: the files the gguf package writes hold the merged weights and Phi-3's vocabulary; in llama.cpp
each one tokenizes chat text like training did, predicts like the merged model and stops at <|end|>; the
Modelfile renders Phi-3's chat template; the merged directory converts with llama.cpp's own converter; bad
input is refused before any work, and an interrupted export leaves nothing half-written.

Tests that run llama.cpp need llama-cpp-python (the [gguf] extra, built from source) and the converter test
needs the llama-cpp-python sdist (conftest finds or downloads it): both skip with the reason when absent, and
fail instead when QLORA_PHI3_REQUIRE_LLAMA_CPP=1, which CI sets after installing them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_gguf
from qlora_phi3.cli import main
from qlora_phi3.errors import UserError
from qlora_phi3.model.tiny import TINY_MODEL_DIR
from qlora_phi3.ship import export as export_mod
from qlora_phi3.ship import export_checks, gguf_writer
from qlora_phi3.ship.export import CheckFailed, export, modelfile_text, write_gguf

PHI3_VOCAB = Path(__file__).resolve().parents[2] / "data" / "phi3_vocab"  # llama.cpp's Phi-3 tokenizer test cases
CHECK_SAMPLES = 4  # held-out conversations per check: enough answer positions, quick on 2 cores


@pytest.fixture(scope="module")
def merged_dir(tiny_run, tmp_path_factory) -> Path:
    from qlora_phi3.ship.merge import merge

    _, run = tiny_run
    out = tmp_path_factory.mktemp("export_merge") / "tiny-merged"
    return merge(str(run.output_dir), str(out), report_samples=2).out_dir


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory, llama_cpp):
    """The tiny run exported once with checks on: f16 and q8_0 by the gguf package, q4_k_m by llama.cpp."""
    _, run = tiny_run
    out = tmp_path_factory.mktemp("export") / "gguf"
    try:
        return export(str(run.output_dir), str(out), quants="q4_k_m,f16,q8_0", check_samples=CHECK_SAMPLES)
    except CheckFailed as e:
        pytest.fail(f"the llama.cpp check failed: {e}")


# ------------------------------------------------------------------------------- the gguf package alone


@pytest.mark.slow  # reuses the session's trained run
def test_gguf_package_writes_f16_and_q8_0_with_the_merged_weights(merged_dir, tmp_path, monkeypatch):
    """Without llama-cpp-python: f16 and q8_0 are written, hold the merged weights, the PHI3 keys and the
    tokenizer; nothing claims to be checked."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    monkeypatch.setattr(export_checks, "llama_cpp_module", lambda: None)
    result = export(str(merged_dir), str(tmp_path / "out"), quants="f16,q8_0")
    assert result.report["checked"] is False
    assert sorted(p.name for p in result.out_dir.iterdir()) == [
        "Modelfile", "export_report.json", "tiny-merged-f16.gguf", "tiny-merged-q8_0.gguf"]

    weights = {}
    for shard in merged_dir.glob("*.safetensors"):
        weights.update(load_file(str(shard)))
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    config = json.loads((merged_dir / "config.json").read_text())
    for quant, tol in (("f16", 0.0), ("q8_0", 1 / 127)):  # q8_0: one step of the block's absmax / 127
        reader, kv = read_gguf(result.files[quant])
        assert kv["general.architecture"] == "phi3" and "Phi-3" in kv["general.name"]
        assert kv["phi3.block_count"] == config["num_hidden_layers"]
        assert kv["phi3.context_length"] == config["max_position_embeddings"]
        assert kv["tokenizer.ggml.model"] == "llama"
        assert kv["tokenizer.ggml.tokens"][: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
        assert kv["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
        assert kv["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|end|>")
        assert kv["tokenizer.ggml.add_bos_token"] is False  # training fed no <s> (data/encode.py)
        assert kv["tokenizer.chat_template"] == tok.chat_template
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == len(weights)
        for hf_name, gg_name in (("model.layers.0.self_attn.qkv_proj.weight", "blk.0.attn_qkv.weight"),
                                 ("model.layers.3.mlp.gate_up_proj.weight", "blk.3.ffn_up.weight"),
                                 ("lm_head.weight", "output.weight"), ("model.norm.weight", "output_norm.weight")):
            t = tensors[gg_name]
            want = weights[hf_name].float().numpy()
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            is_norm = gg_name.endswith("norm.weight")
            assert t.tensor_type.name == ("F32" if is_norm else quant.upper())
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= tol * scale + 1e-7, (quant, gg_name)
    sizes = {q: result.report["files"][q]["bytes"] for q in ("f16", "q8_0")}
    assert 0.5 < sizes["q8_0"] / sizes["f16"] < 0.6  # 8.5 bits per weight against 16


@pytest.mark.slow  # reuses the session's trained run
def test_k_quants_without_llama_cpp_name_the_extra(merged_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export_checks, "llama_cpp_module", lambda: None)
    with pytest.raises(UserError, match=r"q4_k_m.*qlora-phi3\[gguf\]"):
        export(str(merged_dir), str(tmp_path / "out"), quants="q8_0,q4_k_m")
    with pytest.raises(UserError, match=r"--check.*qlora-phi3\[gguf\]"):
        export(str(merged_dir), str(tmp_path / "out"), quants="q8_0", check=True)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- proof in llama.cpp


@pytest.mark.slow  # reuses the session's trained run
def test_each_file_passes_the_llama_cpp_check(exported):
    report = json.loads((exported.out_dir / "export_report.json").read_text())
    assert report == json.loads(json.dumps(exported.report))
    assert report["checked"] and report["reference"]["conversations"] == CHECK_SAMPLES
    assert "eval split" in report["reference"]["source"]  # the run's own held-out conversations
    for quant in ("f16", "q8_0", "q4_k_m"):
        c = report["files"][quant]["check"]
        assert c["passed"], (quant, c)
        assert c["token_ids_equal"] == c["conversations"] == CHECK_SAMPLES
        assert c["top1_agreement"] >= (0.99 if quant != "q4_k_m" else 0.95)
        assert c["stopped_at_end"] == CHECK_SAMPLES and set(c["stop_tokens"]) == {"<|end|>"}
        assert c["eog_tokens"] == {"<|end|>": True, "<|endoftext|>": True}
    # q4_k_m came from llama.cpp's quantizer: K-quant blocks where rows allow (the tiny model's 256-wide
    # down_proj), llama.cpp's fallbacks for its 128-wide rows.
    types = report["files"]["q4_k_m"]["tensor_types"]
    assert report["files"]["q4_k_m"]["written_by"] == "llama.cpp" and set(types) & {"Q4_K", "Q5_K", "Q6_K"}
    assert not (exported.out_dir / "merged").exists()  # the merge was staged, not shipped


@pytest.mark.slow  # a subprocess or a measured training run: the full tier
def test_vocabulary_tokenizes_like_phi3_in_llama_cpp(llama_cpp, tmp_path):
    """Our vocabulary, rebuilt from tokenizer.json, gives in llama.cpp the ids Phi-3's Hugging Face tokenizer
    gives llama.cpp's own Phi-3 test strings (tests/data/phi3_vocab), and transformers' ids on chat text:
    special tokens, Phi-3's rstrip after them (docs/pitfalls.md), runs of spaces, bytes."""
    from transformers import AutoTokenizer

    from qlora_phi3.model.tokenizer import read_reference_cases

    ours = tmp_path / "ours.gguf"
    write_gguf(TINY_MODEL_DIR, ours, "q8_0", "tiny")
    tok = AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))
    cases = read_reference_cases(PHI3_VOCAB / "ggml-vocab-phi-3.gguf.inp", PHI3_VOCAB / "ggml-vocab-phi-3.gguf.out")
    chats = ["<|user|>\nHi<|end|>\n<|assistant|>\n", "<|user|>\n Hi there<|end|>\n<|assistant|>\n  two  spaces",
             "<|system|>\nTabs\tand\nnewlines\n\n<|end|>\n<|user|>\n3 + 4 = ?<|end|>\n<|assistant|>\n7<|end|>",
             "Ünïcödé: 日本語, emoji 🦙, bytes \x01 and '   ' runs", "<|endoftext|> after", "a</s> b"]
    llm = llama_cpp.Llama(model_path=str(ours), vocab_only=True, verbose=False)
    try:
        assert len(cases) > 40
        for text, want in cases:  # llama.cpp's test-tokenizer-0: no BOS, special tokens as text
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
        for text in chats:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == \
                tok(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()


@pytest.mark.slow  # a subprocess or a measured training run: the full tier
@pytest.mark.parametrize("kind, n_tokens", [("4k", 300), ("128k", 4200)])
def test_rope_keys_run_like_transformers(llama_cpp, kind, n_tokens, tmp_path):
    """Mini Phi-3-mini-4k / -128k (head dim 96, the published longrope factors): llama.cpp computes the same
    logits as transformers, the 128k model past 4096 tokens too, where both switch to the long factors and the
    attention factor matters."""
    from transformers import AutoModelForCausalLM

    from qlora_phi3.model.tiny import build_model_dir, mini_phi3_config

    model_dir = build_model_dir(tmp_path / kind, mini_phi3_config(
        kind, hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    path = tmp_path / f"{kind}.gguf"
    write_gguf(model_dir, path, "f16", "mini")
    reader, kv = read_gguf(path)
    assert kv["phi3.rope.scaling.original_context_length"] == 4096
    if kind == "128k":
        assert kv["phi3.context_length"] == 131072
        assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)
        assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= {t.name for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():  # the f16 file's weights, computed in float32 like llama.cpp does
            param.copy_(param.half().float()) if param.dim() > 1 else None
        ids = np.random.default_rng(0).integers(300, 31000, n_tokens).tolist()
        want = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].numpy()  # the last token sees them all
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_tokens + 16, n_batch=n_tokens, n_ubatch=n_tokens,
                          verbose=False)
    try:
        llm.eval(ids)
        got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()
    # fp32 on both sides, different kernels: 0.01 at logits of |30-40| (measured 0.008); a wrong factor or
    # attention scale moves them by far more.
    assert np.abs(got - want).max() < 0.03, np.abs(got - want).max()


@pytest.mark.slow  # a subprocess or a measured training run: the full tier
def test_failed_check_exits_non_zero_naming_quant_and_numbers(tmp_path, capsys, llama_cpp):
    """The untrained tiny base never learned to end its turn: the check must say so, not pass."""
    code = main(["export", str(TINY_MODEL_DIR), "--out", str(tmp_path / "out"), "--quant", "q8_0",
                 "--check-samples", "2"])
    shown = capsys.readouterr()
    err = shown.err
    assert code == CheckFailed.exit_code == 3
    assert "q8_0" in err and re.search(r"stopped at <\|end\|> on 0/2", err), err
    assert "FAIL" in shown.out and "exported" not in shown.out  # the table with the numbers, no success line
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["files"]["q8_0"]["check"]["passed"] is False


# ------------------------------------------------------------------------------- the Modelfile


def _go_template(template: str, data: dict) -> str:
    """The subset of Go's text/template that Ollama templates use here: {{- -}} trimming, range with index
    and element variables, if/else, := variables, and the eq, ne, len and slice functions."""
    tokens, pos = [], 0
    for m in re.finditer(r"\{\{(- )?(.*?)( -)?\}\}", template, re.S):
        tokens.append(["text", template[pos:m.start()]])
        tokens.append(["act", m.group(2).strip(), bool(m.group(1)), bool(m.group(3))])
        pos = m.end()
    tokens.append(["text", template[pos:]])
    for i, t in enumerate(tokens):  # trim markers eat the white space of the neighbouring text
        if t[0] == "act" and t[2]:
            tokens[i - 1][1] = tokens[i - 1][1].rstrip(" \t\r\n")
        if t[0] == "act" and t[3]:
            tokens[i + 1][1] = tokens[i + 1][1].lstrip(" \t\r\n")

    def parse(i):
        nodes = []
        while i < len(tokens):
            t = tokens[i]
            word = t[1].split()[0] if t[0] == "act" else None
            if word in ("end", "else"):
                return nodes, i
            if word in ("if", "range"):
                body, i = parse(i + 1)
                alt = []
                if tokens[i][1] == "else":
                    alt, i = parse(i + 1)
                nodes.append((word, t[1][len(word):].strip(), body, alt))
            else:
                nodes.append((t[0], t[1]))
            i += 1
        return nodes, i

    def value(term, dot, env):
        if isinstance(term, list):
            return call(term, dot, env)
        if term.startswith('"'):
            return term[1:-1]
        if term.isdigit():
            return int(term)
        if term.startswith("$."):
            return data[term[2:]]
        if term.startswith("$"):
            return env[term]
        return dot[term[1:]] if term != "." else dot

    def call(terms, dot, env):
        fns = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "len": len, "slice": lambda a, i: a[i:]}
        if isinstance(terms[0], str) and terms[0] in fns:
            return fns[terms[0]](*(value(t, dot, env) for t in terms[1:]))
        assert len(terms) == 1, terms
        return value(terms[0], dot, env)

    def expr(src):
        stack = [[]]
        for tok in re.findall(r'\(|\)|"[^"]*"|[^\s()]+', src):
            if tok == "(":
                stack.append([])
            elif tok == ")":
                inner = stack.pop()
                stack[-1].append(inner)
            else:
                stack[-1].append(tok)
        return stack[0]

    def run(nodes, dot, env):
        out = ""
        for n in nodes:
            if n[0] == "text":
                out += n[1]
            elif n[0] == "act":
                m = re.fullmatch(r"(\$\w+) := (.*)", n[1])
                if m:
                    env[m.group(1)] = call(expr(m.group(2)), dot, env)
                else:
                    out += str(call(expr(n[1]), dot, env))
            elif n[0] == "if":
                out += run(n[2] if call(expr(n[1]), dot, env) else n[3], dot, env)
            else:  # range $i, $x := LIST
                names, src = n[1].split(":=")
                i_name, x_name = (s.strip() for s in names.split(","))
                for i, item in enumerate(call(expr(src), dot, env)):
                    out += run(n[2], item, {**env, i_name: i, x_name: item})
        return out

    return run(parse(0)[0], data, {})


@pytest.mark.slow  # reuses the session's trained run
def test_modelfile_is_valid_and_renders_phi3_chat_template(merged_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(export_checks, "llama_cpp_module", lambda: None)
    out = export(str(merged_dir), str(tmp_path / "out"), quants="q8_0,f16", name="my-bot").out_dir
    text = (out / "Modelfile").read_text()
    # Ollama's Modelfile grammar: INSTRUCTION arguments, with """ for multi-line values, # for comments.
    commands = re.findall(r'^(?!#)([A-Z]+) ("""[\s\S]*?"""|.*)$', text, re.M)
    assert [c for c, _ in commands] == ["FROM", "TEMPLATE", "PARAMETER", "PARAMETER", "PARAMETER"]
    args = dict(commands[:2])
    assert args["FROM"] == "./my-bot-q8_0.gguf" and (out / "my-bot-q8_0.gguf").is_file()  # the first --quant
    params = [a.split(" ", 1) for c, a in commands if c == "PARAMETER"]
    assert params == [["stop", '"<|end|>"'], ["stop", '"<|endoftext|>"'], ["num_ctx", "4096"]]
    template = args["TEMPLATE"][3:-3]
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    for messages in ([{"role": "user", "content": "What is 3 plus 4?"}],
                     [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye\n"}]):
        ollama = _go_template(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
        assert ollama == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "# The model supports 131072 tokens" in modelfile_text("x.gguf", 131072)
    assert "PARAMETER num_ctx 4096" in modelfile_text("x.gguf", 131072)


# ------------------------------------------------------------------------------- llama.cpp's converter


@pytest.mark.slow  # reuses the session's trained run
def test_merged_dir_converts_with_llama_cpps_converter(llama_cpp, llama_cpp_src, merged_dir, tmp_path):
    """Users who prefer llama.cpp's own tools can convert the merged directory: it carries tokenizer.model
    (docs/pitfalls.md), and the result tokenizes chat text like training, without a <s> and with Phi-3's rstrip
    (its model card names it Phi-3: docs/pitfalls.md), and predicts like ours."""
    from transformers import AutoTokenizer

    assert (merged_dir / "tokenizer.model").is_file()
    converted = tmp_path / "converted-f16.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # it uses its own gguf-py
    proc = subprocess.run([sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(merged_dir),
                           "--outfile", str(converted), "--outtype", "f16"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Phi-3" in read_gguf(converted)[1]["general.name"]
    ours = tmp_path / "ours-f16.gguf"
    write_gguf(merged_dir, ours, "f16", "tiny")
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    messages = [{"role": "system", "content": "You are a quiz bot."}, {"role": "user", "content": "What is 3 plus 4?"},
                {"role": "assistant", "content": "3 plus 4 is 7."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    logits = []
    for path in (converted, ours):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
        try:
            # add_bos=True: add what the file says to add, as llama.cpp front ends do
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, path.name
            llm.eval(ids)
            logits.append(np.asarray(llm.scores[: len(ids)]).copy())
        finally:
            llm.close()
    assert np.abs(logits[0] - logits[1]).max() < 1e-3  # same weights, same graph


# ------------------------------------------------------------------------------- bad input


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_what_is_not_a_phi3_model(merged_dir, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(merged_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match=r"model_type is 'llama', not 'phi3'"):
        export(str(other), str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"neither a run directory"):
        export(str(tmp_path), str(tmp_path / "out2"))  # no model in it at all
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_an_adapter_without_its_base(tiny_run, tmp_path):
    _, run = tiny_run
    adapter = tmp_path / "adapter"
    shutil.copytree(run.adapter_dir, adapter)
    meta = json.loads((adapter / "qlora_phi3.json").read_text())
    (adapter / "qlora_phi3.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=r"gone.*not a model directory"):
        export(str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_shows_the_files_and_what_to_run_next(tmp_path, capsys):
    """export returns what it wrote and prints no summary; the command shows it: the table, then the next step."""
    out = tmp_path / "out"
    result = export(str(TINY_MODEL_DIR), str(out), quants="q8_0", check=False, name="bot")
    assert result.files == {"q8_0": out / "bot-q8_0.gguf"} and result.report["files"]["q8_0"]["check"] is None
    assert "exported" not in capsys.readouterr().out
    assert main(["export", str(TINY_MODEL_DIR), "--out", str(out), "--force", "--quant", "q8_0", "--no-check",
                 "--name", "bot"]) == 0
    shown = capsys.readouterr().out
    assert "export: " in shown and "not checked in llama.cpp" in shown and "│ q8_0" in shown
    assert "exported q8_0 in " in shown and f"ollama create bot -f {out / 'Modelfile'} && ollama run bot" in shown
    assert f"`llama-cli -m {out / 'bot-q8_0.gguf'} -cnv`" in shown


@pytest.mark.slow  # reuses the session's trained run
def test_refuses_unknown_quant_and_existing_out(merged_dir, tmp_path, capsys):
    assert main(["export", str(merged_dir), "--out", str(tmp_path / "o"), "--quant", "q8_0,q3_xs"]) == 2
    assert "--quant q3_xs: unknown; choose from f16, bf16, q8_0" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; add --force"):
        export(str(merged_dir), str(busy), check=False)
    with pytest.raises(UserError, match="not an export"):
        export(str(merged_dir), str(busy), check=False, force=True)  # --force never deletes other files
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="would replace the directory it exports from"):
        export(str(merged_dir), str(merged_dir.parent), check=False, force=True)


@pytest.mark.slow  # reuses the session's trained run
def test_force_replaces_an_export_and_an_interrupted_one_leaves_it_intact(merged_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = export(str(merged_dir), str(out), quants="q8_0", check=False)
    before = sorted(p.name for p in out.iterdir())
    calls = []

    def dies_on_second(model_dir, dest, quant, name, vocab=None):
        calls.append(quant)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_gguf(model_dir, dest, quant, name, vocab)

    monkeypatch.setattr(gguf_writer, "write_gguf", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        export(str(merged_dir), str(out), quants="f16,q8_0", check=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == before  # the previous export, untouched
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no staging left behind
    monkeypatch.undo()
    second = export(str(merged_dir), str(out), quants="f16", check=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export_report.json", "tiny-merged-f16.gguf"]
    assert first.report["files"].keys() != second.report["files"].keys()


@pytest.mark.slow  # reuses the session's trained run
def test_a_failed_check_never_replaces_a_good_export(merged_dir, tmp_path, monkeypatch):
    """`export --force` whose new files fail the llama.cpp check leaves the earlier good export as it was and puts
    the failed files beside it (the first-day report: a good q8_0 was deleted by a failing q4_k_m export)."""
    out = tmp_path / "out"
    export(str(merged_dir), str(out), quants="q8_0", check=False)
    good = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_checks(llama_cpp, src, model_dir, files, n):
        return {q: {"passed": False, "problems": ["top-1 agreement 0.40 < 0.95"]} for q in files}, None

    monkeypatch.setattr(export_checks, "llama_cpp_module", lambda: object())  # a check runs, as with llama-cpp-python
    monkeypatch.setattr(export_mod, "_run_checks", failing_checks)
    with pytest.raises(CheckFailed, match="left as it was") as e:
        export(str(merged_dir), str(out), quants="f16", check=True, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
    failed = tmp_path / "out-failed"
    assert str(failed) in str(e.value) and (failed / "tiny-merged-f16.gguf").is_file()
    assert e.value.result.out_dir == failed and e.value.result.files == {"f16": failed / "tiny-merged-f16.gguf"}


def test_each_familys_modelfile_template_renders_its_chat_template():
    """Ollama's template for each tokenizer family renders what the family's own chat template renders (Phi-4:
    '<|im_start|>ROLE<|im_sep|>' headers, '<|im_end|>' turn ends), and the Modelfile stops at the family's stops."""
    import jinja2

    from qlora_phi3.family import PHI3, PHI4, PHI4_MINI
    from qlora_phi3.ship.modelfile import ollama_template

    for family in (PHI3, PHI4_MINI, PHI4):
        chat = jinja2.Environment().from_string(family.chat_template)
        for messages in ([{"role": "user", "content": "What is 3 plus 4?"}],
                         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye\n"}]):
            ollama = _go_template(ollama_template(family),
                                  {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
            assert ollama == chat.render(messages=messages, add_generation_prompt=True, eos_token="<eos>"), family.name
        stops = [line for line in modelfile_text("x.gguf", 16384, family=family).splitlines() if "stop" in line]
        assert stops == [f'PARAMETER stop "{t}"' for t in family.stop_tokens]
    assert "<|im_start|>{{ .Role }}<|im_sep|>" in ollama_template(PHI4)
