"""The Phi family as data: published facts, offline estimates, the tiny shapes, Phi-4-mini's real o200k tokenizer,
labels and stops on each family's own tokens, and refusals that name what is supported."""

import copy
import hashlib
import json
import lzma
from pathlib import Path

import pytest

from qlora_phi3.config import ModelConfig, load_recipe
from qlora_phi3.data.encode import encode_conversation
from qlora_phi3.errors import UserError
from qlora_phi3.family import PHI3, PHI4_MINI, PHI4_MINI_REASONING_SYSTEM_PROMPT, PUBLISHED, check_supported, \
    family_for_config, published
from qlora_phi3.memory.estimate import config_for_estimate, estimate, lora_shapes, rotary_dims
from qlora_phi3.phi3 import IGNORE_INDEX

PHI4 = "microsoft/Phi-4-mini-instruct"
RECIPE = "recipes/phi3_mini_4k_12gb.yaml"
# Copies of published files, with their sources in docs/models.md.
PUBLISHED_FILES = Path(__file__).parents[2] / "data" / "published"


def _recipe(hub, *overrides):
    return load_recipe(RECIPE, [f"model.name_or_path={hub}", "model.revision=null", *overrides])


def _terms(est):
    return {t.name.split(" (")[0]: t.n_bytes for t in est.terms}


@pytest.mark.parametrize("hub", list(PUBLISHED))
def test_every_published_model_estimates_offline_from_its_own_config(hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no download"))
    recipe = _recipe(hub)
    cfg = config_for_estimate(recipe.model)
    facts = PUBLISHED[hub].config
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (
        facts["hidden_size"], facts["num_key_value_heads"], facts["vocab_size"])
    est = estimate(recipe, cfg)
    rows = 1 if facts["tie_word_embeddings"] else 2
    assert _terms(est)["16-bit embeddings and lm_head"] == rows * facts["vocab_size"] * facts["hidden_size"] * 2
    assert est.total_gib > 3


def test_phi4_mini_shapes_come_from_its_config_not_phi3_mini():
    recipe = _recipe(PHI4)
    cfg = config_for_estimate(recipe.model)
    # The fused qkv_proj is 24 x 128 + 2 x 8 x 128 = 5120 rows (the published tensor is [5120, 3072]), not 9216.
    shapes = lora_shapes(recipe, cfg)
    qkv_b = shapes[1]  # (out, r) of the first target, qkv_proj
    assert qkv_b == (5120, 16)
    assert rotary_dims(cfg) == 96  # partial_rotary_factor 0.75 of head dim 128
    n = recipe.data.max_seq_len * recipe.train.micro_batch_size
    assert _terms(estimate(recipe, cfg))["saved activations"] == n * (32 * 2 * 3072 + 4 * 96)
    mini = config_for_estimate(_recipe("microsoft/Phi-3-mini-4k-instruct").model)
    # Its 200,064-row vocabulary makes each chunk of logits ~6x Phi-3's, and the tied matrix is counted once.
    e4, e3 = _terms(estimate(recipe, cfg)), _terms(estimate(_recipe("microsoft/Phi-3-mini-4k-instruct"), mini))
    assert e4["logits and loss"] > 3 * e3["logits and loss"]
    assert e4["16-bit embeddings and lm_head"] == 200064 * 3072 * 2


def test_medium_has_grouped_kv_in_its_lora_widths():
    recipe = _recipe("microsoft/Phi-3-medium-4k-instruct")
    cfg = config_for_estimate(recipe.model)
    assert lora_shapes(recipe, cfg)[1] == (5120 + 2 * 10 * 128, 16)  # 40 query heads, 10 KV heads, head dim 128


@pytest.mark.parametrize("name, expect", [
    ("microsoft/Phi-3-small-8k-instruct", "another architecture"),
    ("microsoft/Phi-3-small-128k-instruct", "another architecture"),
    ("microsoft/Phi-4-mini-flash-reasoning", "SambaY"),
    ("microsoft/Phi-3-vision-128k-instruct", "vision"),
    ("microsoft/Phi-3.5-vision-instruct", "vision"),
    ("microsoft/Phi-4-multimodal-instruct", "vision/speech"),
])
def test_unsupported_models_are_refused_naming_what_is_supported(name, expect):
    with pytest.raises(UserError) as err:
        check_supported(name)
    msg = str(err.value)
    assert expect in msg and PHI4 in msg and "microsoft/Phi-3-medium-4k-instruct" in msg


def test_refusal_by_config_for_local_directories(tmp_path):
    from types import SimpleNamespace as NS

    check_supported(str(tmp_path), NS(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=200064))
    check_supported(str(tmp_path), NS(model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=100352))
    for cfg, expect in ((NS(model_type="phi3small", architectures=["Phi3SmallForCausalLM"], vocab_size=100352),
                         "another architecture"),
                        (NS(model_type="phi3_v", architectures=["Phi3VForCausalLM"], vocab_size=32064), "vision"),
                        (NS(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000), "'llama'")):
        with pytest.raises(UserError, match="not supported") as err:
            check_supported(str(tmp_path), cfg)
        assert expect in str(err.value)
    assert published("MICROSOFT/phi-4-mini-instruct") is PUBLISHED[PHI4]


def test_read_model_config_refuses_before_any_download():
    from qlora_phi3.model.load import read_model_config

    with pytest.raises(UserError, match="Phi-3-small is another architecture"):
        read_model_config(ModelConfig(name_or_path="microsoft/Phi-3-small-8k-instruct"))


# --------------------------------------------------------------------------------------------- o200k tokenizer


def test_shipped_o200k_ranks_are_openais_file_byte_for_byte():
    from qlora_phi3.model.o200k import ASSET, N_RANKS, O200K_SHA256, load_ranks

    assert hashlib.sha256(lzma.decompress(ASSET.read_bytes())).hexdigest() == O200K_SHA256
    ranks = load_ranks()
    assert len(ranks) == N_RANKS and sorted(ranks.values()) == list(range(N_RANKS))


def test_derived_tokenizer_is_kept_in_the_users_cache_and_derived_again_when_an_input_changes(tmp_path, monkeypatch):
    """The ~10 s merge derivation runs once per machine, not once per process; a change to what it reads (here the
    tokenizers version) names another cache file, so a stale one is never read."""
    import tokenizers

    from qlora_phi3.model import o200k

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    derived = []
    monkeypatch.setattr(o200k, "_derive_tokenizer_json", lambda vocab: derived.append(1) or f'{{"n": {len(derived)}}}')
    fresh = o200k.tokenizer_json.__wrapped__  # past the per-process lru_cache: what a new process does
    assert fresh() == '{"n": 1}' and fresh() == '{"n": 1}' and len(derived) == 1
    cached = list((tmp_path / "qlora-phi3" / "o200k").iterdir())
    assert len(cached) == 1 and cached[0].read_text() == '{"n": 1}'
    monkeypatch.setattr(tokenizers, "__version__", tokenizers.__version__ + ".other")
    assert fresh() == '{"n": 2}' and len(list(cached[0].parent.iterdir())) == 2


def test_rebuilt_tokenizer_gives_llama_cpps_published_o200k_ids(phi4_tokenizer):
    """llama.cpp records the sha256 of the ids the real o200k tokenizer gives its probe text; ours must match."""
    from qlora_phi3.model.o200k import CHKTXT, LLAMA_CPP_CHKHSH

    ids = phi4_tokenizer(CHKTXT, add_special_tokens=False)["input_ids"]
    assert hashlib.sha256(str(ids).encode()).hexdigest() == LLAMA_CPP_CHKHSH
    assert phi4_tokenizer("hello world", add_special_tokens=False)["input_ids"] == [24912, 2375]  # tiktoken's test


def test_tokenizer_loads_with_o200k_split_even_where_transformers_would_not(tiny_phi4_mini_dir, tmp_path):
    """A tokenizer-only directory (no config.json) makes transformers 5 build its GPT2Tokenizer class, which swaps
    in GPT-2's pre-tokenizer and tokenizes whitespace differently from the published tokenizer; auto_tokenizer (used
    by load_tokenizer, chat and export) keeps tokenizer.json's."""
    import shutil

    from transformers import AutoTokenizer

    from qlora_phi3.model.load import auto_tokenizer
    from qlora_phi3.model.o200k import CHKTXT, LLAMA_CPP_CHKHSH

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny_phi4_mini_dir / name, tmp_path / name)
    def digest(tok):
        return hashlib.sha256(str(tok(CHKTXT, add_special_tokens=False)["input_ids"]).encode()).hexdigest()

    assert digest(AutoTokenizer.from_pretrained(str(tmp_path))) != LLAMA_CPP_CHKHSH
    assert digest(auto_tokenizer(str(tmp_path))) == LLAMA_CPP_CHKHSH


def test_phi4_mini_special_tokens_ids_and_pad(phi4_tokenizer):
    for text, token_id in PHI4_MINI.special_ids.items():
        assert phi4_tokenizer.convert_tokens_to_ids(text) == token_id, text
    assert phi4_tokenizer.eos_token_id == phi4_tokenizer.pad_token_id == phi4_tokenizer.bos_token_id == 199999
    assert phi4_tokenizer.chat_template == PHI4_MINI.chat_template


def _labelled(tokenizer, ids, labels):
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_phi4_mini_labels_are_exactly_the_replies_and_their_end(phi4_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "\nHello there"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": " 4"}]
    text = phi4_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == ("<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>\nHello there<|end|><|user|>2+2?<|end|>"
                    "<|assistant|> 4<|end|><|endoftext|>")  # no newline after role tokens
    ids, labels = encode_conversation(phi4_tokenizer, messages)
    assert _labelled(phi4_tokenizer, ids, labels) == "\nHello there<|end|> 4<|end|>"
    end, assistant = 200020, 200019
    assert sum(1 for i, lab in zip(ids, labels) if lab == end) == 2  # each reply's own <|end|> carries loss
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i in (assistant, 199999, 200021, 200022))


def test_phi4_mini_tokenizer_tables_are_the_published_files():
    """Our Phi-4-mini table against Microsoft's copies of Phi-4-mini-instruct's and Phi-4-mini-reasoning's
    tokenizer_config.json (onnxruntime-extensions test data): every added token's id, which are 'special' (the tool
    markup is not), bos / eos / pad and the chat template."""
    instruct, reasoning = (json.loads((PUBLISHED_FILES / f"microsoft_Phi-4-mini-{name}_tokenizer_config.json")
                                      .read_text(encoding="utf-8")) for name in ("instruct", "reasoning"))
    for published_config in (instruct, reasoning):
        added = published_config["added_tokens_decoder"]
        assert {t["content"]: int(i) for i, t in added.items()} == PHI4_MINI.special_ids
        assert {t["content"] for t in added.values() if not t["special"]} == {
            "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>"}
        assert (published_config["bos_token"], published_config["eos_token"], published_config["pad_token"]) == (
            PHI4_MINI.bos_token, PHI4_MINI.eos_token, PHI4_MINI.pad_token)
    assert instruct["chat_template"] == PHI4_MINI.chat_template


# Microsoft's test of Phi-4-mini-reasoning's tokenizer (onnxruntime-extensions test/pp_api_test/test_tokenizer_chat.cc,
# Phi4MiniReasoningChatTemplate, commit 319f8d2c02c4): the prompt and ids 'from HuggingFace Python output'.
KNIGHT = [{"role": "system", "content": "You are a medieval knight and must provide explanations to modern people."},
          {"role": "user", "content": "How should I explain the Internet?"}]
KNIGHT_PROMPT = ("<|system|>Your name is Phi, an AI math expert developed by Microsoft. You are a medieval knight and "
                 "must provide explanations to modern people.<|end|><|user|>How should I explain the Internet?<|end|>"
                 "<|assistant|>")
KNIGHT_IDS = [200022, 9719, 1308, 382, 102143, 11, 448, 20837, 13324, 8333, 9742, 656, 8321, 13, 1608, 553, 261, 55145,
              105457, 326, 2804, 3587, 69457, 316, 6809, 1665, 13, 200020, 200021, 5299, 1757, 357, 16644, 290, 7380,
              30, 200020, 200019]


def _mini_reasoning(tok):
    tok = copy.copy(tok)  # the session's tokenizer keeps Phi-4-mini-instruct's template
    tok.chat_template = PUBLISHED["microsoft/Phi-4-mini-reasoning"].chat_template
    return tok


def test_phi4_mini_reasoning_template_gives_the_published_prompt_token_for_token(phi4_tokenizer):
    tok = _mini_reasoning(phi4_tokenizer)
    text = tok.apply_chat_template(KNIGHT, tokenize=False, add_generation_prompt=True)
    assert text == KNIGHT_PROMPT
    assert tok(text, add_special_tokens=False)["input_ids"] == KNIGHT_IDS
    # No system message: the template writes its own, as the model card's chat format shows.
    assert tok.apply_chat_template(KNIGHT[1:], tokenize=False, add_generation_prompt=True) == (
        f"<|system|>{PHI4_MINI_REASONING_SYSTEM_PROMPT}<|end|><|user|>How should I explain the Internet?<|end|>"
        "<|assistant|>")


def test_phi4_mini_reasoning_labels_each_reply_with_its_think_block_never_the_system_prompt(phi4_tokenizer):
    tok = _mini_reasoning(phi4_tokenizer)
    r1, r2 = "<think>3x^2 + 4x + 4 has discriminant -32.</think>No real root.", "<think>-2/3 ± ...</think>x = -2/3 ± i"
    turns = [{"role": "user", "content": "Solve 3x^2 + 4x + 5 = 1."}, {"role": "assistant", "content": r1},
             {"role": "user", "content": "Over the complex numbers?"}, {"role": "assistant", "content": r2}]
    for messages in (turns, [{"role": "system", "content": "Be brief."}] + turns):
        text = tok.apply_chat_template(messages, tokenize=False)
        assert r1 in text and r2 in text  # the earlier reply keeps its think block: the template writes content as is
        ids, labels = encode_conversation(tok, messages)
        assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == f"{r1}<|end|>{r2}<|end|>"


def test_phi3_labels_unchanged_on_its_own_tokens(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, labels = encode_conversation(tiny_tokenizer, messages)
    assert [lab for lab in labels if lab != IGNORE_INDEX][-1] == PHI3.token_id("<|end|>") == 32007


def test_stops_are_each_familys_own_ids(phi4_tokenizer, tiny_tokenizer):
    from qlora_phi3.model.generate import stop_token_ids

    assert stop_token_ids(phi4_tokenizer) == [200020, 199999]
    assert stop_token_ids(tiny_tokenizer) == [32007, 32000]


# --------------------------------------------------------------------------------------------- tiny shapes


def test_tiny_phi4_mini_has_every_distinguishing_feature(tiny_phi4_mini_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_phi4_mini_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 200064
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] == 24 // 8
    rope = cfg["rope_parameters"]
    assert rope["partial_rotary_factor"] == 0.75 and rope["rope_type"] == "longrope"
    assert len(rope["long_factor"]) == len(rope["short_factor"]) == 16 * 3 // 4 // 2  # head dim 16, 12 rotary dims
    with safe_open(str(tiny_phi4_mini_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" not in names  # tied: one matrix on disk
        assert f.get_slice("model.layers.0.self_attn.qkv_proj.weight").get_shape() == [96 + 2 * 2 * 16, 96]
    assert family_for_config(cfg) is PHI4_MINI
    gen = json.loads((tiny_phi4_mini_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [199999, 200020]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi4_mini_dir))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.tensor([[200021, 12194, 200020, 200019]])).logits.shape == (1, 4, 200064)


def test_tiny_shapes_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    from qlora_phi3.model.tiny import build_tiny_shape

    a, b = build_tiny_shape("phi3-medium", tmp_path / "a"), build_tiny_shape("phi3-medium", tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (4, 1, False)


def test_tiny_phi35_mini_keeps_its_published_longrope_factors():
    """Phi-3.5-mini's tiny shape has its head dim (96), so its config carries the published factors unresampled; the
    other 128k Phi-3 models' tiny configs fall back to the same curves (their own lists are not offline)."""
    from qlora_phi3.family import PHI35_MINI_LONG_FACTOR, PHI35_MINI_SHORT_FACTOR
    from qlora_phi3.model.tiny import TINY_SHAPES, mini_config

    hub, sizes = TINY_SHAPES["phi3.5-mini"]
    facts = PUBLISHED[hub].config
    rope = mini_config(hub, **sizes).rope_parameters
    assert rope["rope_type"] == "longrope" and len(PHI35_MINI_LONG_FACTOR) == facts["hidden_size"] // 32 // 2 == 48
    assert rope["long_factor"] == facts["long_factor"] == PHI35_MINI_LONG_FACTOR
    assert rope["short_factor"] == facts["short_factor"] == PHI35_MINI_SHORT_FACTOR
    mini_128k = mini_config("microsoft/Phi-3-mini-128k-instruct", hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=4)
    assert len(mini_128k.rope_parameters["long_factor"]) == 8  # resampled to head dim 16's pairs
    assert mini_128k.rope_parameters["long_factor"][0] == PHI35_MINI_LONG_FACTOR[0]


# --------------------------------------------------------------------------------------------- recipes


FAMILY_RECIPES = ("phi35_mini_12gb", "phi4_mini_12gb", "phi4_mini_8gb", "phi3_medium_4k_12gb", "phi4_12gb",
                  "phi4_reasoning_12gb", "phi4_mini_reasoning_12gb", "phi4_mini_12gb_grpo", "phi35_mini_12gb_grpo",
                  "phi4_mini_reasoning_12gb_grpo")


@pytest.mark.parametrize("name", FAMILY_RECIPES)
def test_family_recipes_fit_their_budget_as_their_header_says(name):
    """Each recipe's header states the estimator's prediction for it, offline, and it fits the budget it is named
    after with the 10% margin `fit` keeps."""
    import re

    from qlora_phi3.config import shipped_recipes

    path = shipped_recipes()[name]
    recipe = load_recipe(path)
    model = published(recipe.model.name_or_path)
    assert model is not None and recipe.model.revision in (None, model.revision)
    said = float(re.search(r"Predicted peak: ([\d.]+) GiB", path.read_text()).group(1))
    est = estimate(recipe, config_for_estimate(recipe.model))
    assert est.total_gib == pytest.approx(said, abs=0.005)
    budget = int(re.search(r"_(\d+)gb(_|$)", name).group(1))
    assert est.total_gib <= 0.9 * budget
    assert recipe.data.max_seq_len <= PUBLISHED[model.hub_id].config["max_position_embeddings"]


def test_data_inspection_shows_phi4_mini_tokens_as_text(phi4_tokenizer):
    """`qlora-phi3 data` renders each token as the text it stands for: byte-level pieces ('Ġ', split UTF-8) too."""
    from qlora_phi3.data.inspect import token_texts

    messages = [{"role": "user", "content": "Olá, 🚀 world\n  x"}, {"role": "assistant", "content": "ok 😶\u200d🌫️"}]
    text = phi4_tokenizer.apply_chat_template(messages, tokenize=False)
    ids = phi4_tokenizer(text, add_special_tokens=False)["input_ids"]
    shown = token_texts(phi4_tokenizer, text, ids)
    assert len(shown) == len(ids) and "".join(shown) == text
    assert "Ġ" not in "".join(shown)


@pytest.mark.slow
def test_tiling_and_chunked_loss_equal_plain_on_phi4_minis_shape(tiny_phi4_mini_dir):
    """Grouped KV (6/2), rotary on 12 of 16 dims, the tied 200,064-row head: the tiled layers and the chunked loss
    give transformers' own loss and the same LoRA gradients."""
    import torch

    from qlora_phi3.config import LoraSettings
    from qlora_phi3.data.packing import PackingCollator, pack_columns, to_model_inputs
    from qlora_phi3.model.load import load_model
    from qlora_phi3.model.lora import attach_lora
    from qlora_phi3.run.loss import model_loss
    from qlora_phi3.run.tiling import enable_tiling

    model = attach_lora(load_model(ModelConfig(name_or_path=str(tiny_phi4_mini_dir)), "cpu", "float32", "sdpa"),
                        LoraSettings(r=8, dropout=0.0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    model.train()
    ids = [torch.randint(3, 199000, (n,), generator=gen).tolist() for n in (13, 21, 9, 30, 17)]
    cols = pack_columns(ids, ids, 48)
    batch = PackingCollator(pad_token_id=199999)([{k: cols[k][r] for k in cols} for r in range(len(cols["input_ids"]))])

    def run(plain: bool):
        model.zero_grad(set_to_none=True)
        inputs = to_model_inputs(batch, "sdpa")
        loss = model(**inputs).loss if plain else model_loss(model, inputs, chunk_tokens=16)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = run(plain=True)
    enable_tiling(model, 16)
    loss, grads = run(plain=False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert any("qkv_proj.lora_B" in n for n in grads)
    for name in grads:
        assert grads_ref[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-6, msg=name)


def test_a_tokenizer_family_is_one_table_entry(monkeypatch):
    """The lookups read FAMILIES: a new entry is found by its vocabulary and its <|end|> id, with no other change;
    a vocabulary no entry has is the default family's (a Phi-3 with added tokens)."""
    import dataclasses

    from qlora_phi3 import family

    other = dataclasses.replace(PHI3, name="phi4", title="Phi-4", vocab_size=100352,
                                special_ids={**PHI3.special_ids, "<|end|>": 100265})
    monkeypatch.setitem(family.FAMILIES, "phi4", other)

    class Tokenizer:
        def convert_tokens_to_ids(self, text):
            return other.special_ids[text]

    assert family_for_config({"vocab_size": 100352}) is other
    assert family.family_for_tokenizer(Tokenizer()) is other
    assert family_for_config({"vocab_size": 32100}) is PHI3
    assert "Phi-4 (100,352)" in family.supported_summary()
