"""Phi-4 (14B) and the reasoning models as one tokenizer family: the real cl100k_base vocabulary shipped and checked
by OpenAI's hash, the tokenizer derived from it giving llama.cpp's published ids, Phi-4's special-token ids, chat
template and pad (against Microsoft's copy of the published file), labels that are exactly each reply and its
<|im_end|>, Phi-4-reasoning's own template (the published prompt token for token, its think blocks in the loss), and
the refusals of what it is not."""

import copy
import hashlib
import json
import lzma
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from qlora_phi3.data.encode import encode_conversation
from qlora_phi3.errors import UserError
from qlora_phi3.family import PHI4, PHI4_REASONING_SYSTEM_PROMPT, PUBLISHED, check_supported, family_for_config, \
    family_for_tokenizer
from qlora_phi3.phi3 import IGNORE_INDEX

# Copies of published files, with their sources in docs/models.md.
PUBLISHED_FILES = Path(__file__).parents[2] / "data" / "published"
REASONING = PUBLISHED["microsoft/Phi-4-reasoning"]


def test_shipped_cl100k_ranks_are_openais_file_byte_for_byte():
    from qlora_phi3.model.cl100k import CL100K, CL100K_SHA256
    from qlora_phi3.model.o200k import load_ranks

    data = lzma.decompress(CL100K.asset.read_bytes())
    assert hashlib.sha256(data).hexdigest() == CL100K_SHA256
    ranks = load_ranks(CL100K)
    assert sorted(ranks.values()) == list(range(100256))  # ids 0-100,255; the added tokens start at 100,256


def test_rebuilt_tokenizer_gives_llama_cpps_published_cl100k_ids(phi4_14b_tokenizer):
    """llama.cpp names the pre-tokenizer by the sha256 of the ids of its probe text: ours gives cl100k's ('dbrx')."""
    from qlora_phi3.model.cl100k import LLAMA_CPP_CHKHSH
    from qlora_phi3.model.o200k import CHKTXT

    ids = phi4_14b_tokenizer(CHKTXT, add_special_tokens=False)["input_ids"]
    assert hashlib.sha256(str(ids).encode()).hexdigest() == LLAMA_CPP_CHKHSH
    # Published elsewhere: tiktoken's cl100k 'hello world'; Microsoft.ML.Tokenizers' Phi-4 test (Hello, ' World').
    assert phi4_14b_tokenizer("hello world")["input_ids"] == [15339, 1917]
    assert phi4_14b_tokenizer("<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>")["input_ids"] == \
        [100264, 9906, 100266, 4435, 100265, 100349]


def test_phi4_special_tokens_ids_template_and_pad(phi4_14b_tokenizer):
    tok = phi4_14b_tokenizer
    assert len(PHI4.special_ids) == 96 and set(PHI4.special_ids.values()) == set(range(100256, 100352))
    for text, token_id in PHI4.special_ids.items():
        assert tok.convert_tokens_to_ids(text) == token_id, text
    assert (tok.convert_tokens_to_ids("<|dummy_0|>"), tok.convert_tokens_to_ids("<|dummy_87|>")) == (100256, 100351)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (100257, 100265, 100349)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template == PHI4.chat_template
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ("<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user"
                                                             "<|im_sep|>U<|im_end|><|im_start|>assistant<|im_sep|>A"
                                                             "<|im_end|>")
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|><|im_start|>assistant<|im_sep|>")
    assert family_for_tokenizer(tok) is PHI4 and family_for_config({"vocab_size": 100352}) is PHI4


def test_phi4_labels_are_exactly_each_reply_and_its_im_end(phi4_14b_tokenizer):
    """The role is plain text ('assistant' is token 78191), so the walk matches the whole header: a user or system
    turn, or a reply that says 'assistant', never opens a span."""
    tok = phi4_14b_tokenizer
    messages = [{"role": "system", "content": "You are an assistant."}, {"role": "user", "content": "assistant?"},
                {"role": "assistant", "content": "\nI am the assistant."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": " 4"}]
    ids, labels = encode_conversation(tok, messages)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(kept) == "\nI am the assistant.<|im_end|> 4<|im_end|>"
    assert kept.count(100265) == 2  # each reply's own <|im_end|> carries loss, and nothing else of the template
    assert 78191 in ids and not {100264, 100266, 100257} & set(kept)
    with pytest.raises(UserError, match="reads as a special token"):
        encode_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a<|im_end|>"}])


def test_phi4_tokenizer_table_is_the_published_file():
    """Our Phi-4 table against Microsoft's copy of microsoft/phi-4's tokenizer_config.json (onnxruntime-extensions
    test data, the version updated after release): all 96 added tokens' ids, bos / eos / pad and the chat template."""
    published_config = json.loads((PUBLISHED_FILES / "microsoft_phi-4_tokenizer_config.json").read_text())
    added = published_config["added_tokens_decoder"]
    assert {t["content"]: int(i) for i, t in added.items()} == PHI4.special_ids
    assert all(t["special"] for t in added.values())
    assert (published_config["bos_token"], published_config["eos_token"], published_config["pad_token"]) == (
        PHI4.bos_token, PHI4.eos_token, PHI4.pad_token)
    assert published_config["chat_template"] == PHI4.chat_template


def test_phi4_renders_the_published_ids(phi4_14b_tokenizer):
    """Microsoft's test of microsoft/phi-4's tokenizer (onnxruntime-extensions test/pp_api_test/
    test_tokenizer_chat.cc, Phi4ChatTemplate, commit 319f8d2c02c4): ids 'from HuggingFace Python output'."""
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "How should I explain the Internet?"}]
    text = phi4_14b_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert phi4_14b_tokenizer(text, add_special_tokens=False)["input_ids"] == [
        100264, 9125, 100266, 2675, 527, 264, 11190, 18328, 13, 100265, 100264, 882, 100266, 4438, 1288, 358, 10552,
        279, 8191, 30, 100265, 100264, 78191, 100266]


@pytest.fixture(scope="module")
def phi4_reasoning_tokenizer(phi4_14b_tokenizer):
    tok = copy.copy(phi4_14b_tokenizer)  # the session's tokenizer keeps Phi-4's template
    tok.chat_template = REASONING.chat_template
    return tok


REASONED = ("<think>3x^2 + 4x + 4 has discriminant 16 - 48 < 0.</think>No real solution.",
            "<think>x = (-4 ± sqrt(-32)) / 6.</think>x = (-2 ± 2i·sqrt(2)) / 3")
TWO_TURNS = [{"role": "user", "content": "Solve 3x^2 + 4x + 5 = 1."}, {"role": "assistant", "content": REASONED[0]},
             {"role": "user", "content": "Over the complex numbers?"}, {"role": "assistant", "content": REASONED[1]}]


def test_phi4_reasoning_template_gives_the_published_prompt(phi4_reasoning_tokenizer):
    """The model card's chat format (as Unsloth's Phi-4 reasoning guide quotes it): the fixed system prompt, then the
    turns; a system message is not written (the template has no branch for it), so it cannot replace that prompt."""
    published = (f"<|im_start|>system<|im_sep|>{PHI4_REASONING_SYSTEM_PROMPT}<|im_end|><|im_start|>user<|im_sep|>"
                 "What is 1+1?<|im_end|><|im_start|>assistant<|im_sep|>")
    question = [{"role": "user", "content": "What is 1+1?"}]
    for messages in (question, [{"role": "system", "content": "Be brief."}] + question):
        assert phi4_reasoning_tokenizer.apply_chat_template(messages, tokenize=False,
                                                            add_generation_prompt=True) == published


def test_phi4_reasoning_labels_are_the_templates_own_generation_spans(phi4_reasoning_tokenizer, phi4_14b_tokenizer):
    """The template marks each reply and its <|im_end|> with {% generation %}: our labels (the token walk) are
    exactly those tokens, think blocks included, in every turn; the fixed system prompt and a system message carry
    no loss, and the encoder says the system message is not in the training text."""
    from qlora_phi3.data.encode import encode_records
    from qlora_phi3.data.read import ChatRecord

    tok = phi4_reasoning_tokenizer
    for messages in (TWO_TURNS, [{"role": "system", "content": "Be brief."}] + TWO_TURNS):
        ids, labels = encode_conversation(tok, messages)
        marked = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert marked["input_ids"] == ids
        assert [lab != IGNORE_INDEX for lab in labels] == [bool(m) for m in marked["assistant_masks"]]
        assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == (
            f"{REASONED[0]}<|im_end|>{REASONED[1]}<|im_end|>")
    warned = []
    records = [ChatRecord([{"role": "system", "content": "Be brief."}] + TWO_TURNS, "x.jsonl:1")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qlora_phi3.ui.warn", warned.append)
        encode_records(records, tok, 4096)
        encode_records(records, phi4_14b_tokenizer, 4096)  # Phi-4's template writes system messages: no warning
    assert len(warned) == 1 and warned[0].startswith("1 of 1 conversations have a system message")


def test_a_template_that_drops_the_turns_behind_a_system_message_is_refused_saying_why(phi4_14b_tokenizer):
    """Unsloth's copy of Phi-4-reasoning's template (tests/data/published/, docs/models.md) writes its fixed system
    prompt once per message, and no turns, when the conversation starts with a system message. The encoder says
    which message is missing and what to do, not that the template is not the model's own."""
    tok = copy.copy(phi4_14b_tokenizer)
    tok.chat_template = (PUBLISHED_FILES / "unsloth_phi-4-reasoning_chat_template.jinja").read_text()
    messages = [{"role": "system", "content": "Be brief."}] + TWO_TURNS
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.count(PHI4_REASONING_SYSTEM_PROMPT) == len(messages) and REASONED[0] not in text
    with pytest.raises(UserError, match=r"does not render message 1 \(user\).*remove the system message"):
        encode_conversation(tok, messages)


def test_phi4_reasoning_config_facts_match_microsofts_phi4_reasoning_vision_config():
    """Phi-4-reasoning's config.json was not found; Microsoft's Phi-4-reasoning-vision-15B (its language model has
    Phi-4's shape) publishes the 32k context, rope_theta 500,000 and the token ids reported for it."""
    vision = json.loads((PUBLISHED_FILES / "microsoft_Phi-4-reasoning-vision-15B_config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "original_max_position_embeddings", "rope_theta", "rope_scaling",
            "sliding_window", "tie_word_embeddings", "rms_norm_eps", "attention_bias", "hidden_act", "bos_token_id",
            "eos_token_id", "pad_token_id")
    assert {k: REASONING.config[k] for k in keys} == {k: vision[k] for k in keys}
    assert vision["partial_rotary_factor"] == 1.0 and REASONING.rotary_dims == REASONING.head_dim


def test_stops_are_phi4s_own_ids(phi4_14b_tokenizer):
    from qlora_phi3.model.generate import stop_token_ids

    assert stop_token_ids(phi4_14b_tokenizer) == [100265, 100257]


def test_phi4_models_are_published_and_estimate_offline():
    for hub in ("microsoft/phi-4", "microsoft/Phi-4-reasoning", "microsoft/Phi-4-reasoning-plus"):
        model = PUBLISHED[hub]
        check_supported(hub)
        assert model.family is PHI4 and model.config["vocab_size"] == 100352
        assert model.config["num_key_value_heads"] * 4 == model.config["num_attention_heads"]
        assert not model.config["tie_word_embeddings"] and model.rotary_dims == model.head_dim == 128
    assert PUBLISHED["microsoft/Phi-4-mini-reasoning"].config["vocab_size"] == 200064


@pytest.mark.parametrize("name, config, expect", [
    ("microsoft/Phi-4-mini-flash-reasoning", None, "SambaY"),
    ("some/local-dir", NS(model_type="phi4flash", architectures=["Phi4FlashForCausalLM"], vocab_size=200064), "SambaY"),
    ("some/local-dir", NS(model_type="renamed", architectures=["Phi4FlashForCausalLM"], vocab_size=200064), "SambaY"),
    ("microsoft/Phi-4-multimodal-instruct", None, "vision/speech"),
    ("some/local-dir", NS(model_type="phi4mm", architectures=["Phi4MMForCausalLM"], vocab_size=200064),
     "vision/speech"),
])
def test_flash_and_multimodal_are_refused_naming_the_architecture_and_what_to_use(name, config, expect):
    with pytest.raises(UserError) as err:
        check_supported(name, config)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg
    assert ("use microsoft/Phi-4-mini-reasoning" if expect == "SambaY" else "use microsoft/Phi-4-mini-instruct") in msg


def test_a_reasoning_reply_keeps_its_think_block_in_the_loss(tiny_phi4_dir):
    """Phi-4-reasoning's tokenizer has <think> and </think> as added tokens: a reply holding its think block is not
    refused, and the block, the solution and <|im_end|> carry loss; the tokens stay refused in a user message."""
    from qlora_phi3.model.load import auto_tokenizer

    tok = auto_tokenizer(str(tiny_phi4_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    reply = "<think>7 and 7 make 14.</think>The answer is 14."
    ids, labels = encode_conversation(tok, [{"role": "user", "content": "7+7?"},
                                            {"role": "assistant", "content": reply}])
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == reply + "<|im_end|>"
    assert tok.convert_tokens_to_ids("<think>") in [lab for lab in labels if lab != IGNORE_INDEX]
    with pytest.raises(UserError, match="'<think>'"):
        encode_conversation(tok, [{"role": "user", "content": "<think>"}, {"role": "assistant", "content": "Hi"}])
