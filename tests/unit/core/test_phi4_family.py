"""Phi-4 (14B) and the reasoning models as one tokenizer family: the real cl100k_base vocabulary shipped and checked
by OpenAI's hash, the tokenizer derived from it giving llama.cpp's published ids, Phi-4's special-token ids, chat
template and pad, labels that are exactly each reply and its <|im_end|>, and the refusals of what it is not."""

import hashlib
import lzma
from types import SimpleNamespace as NS

import pytest

from qlora_phi3.data.encode import encode_conversation
from qlora_phi3.errors import UserError
from qlora_phi3.family import PHI4, PUBLISHED, check_supported, family_for_config, family_for_tokenizer
from qlora_phi3.phi3 import IGNORE_INDEX


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
