"""Labels: loss only on assistant replies and the <|end|> closing each; truncation is counted."""

from qlora_phi3.data.read import ChatRecord
from qlora_phi3.data.encode import IGNORE_INDEX, encode_conversation, encode_records

CONV = [
    {"role": "system", "content": "You are a quiz bot."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "What color is a lime?"},
    {"role": "assistant", "content": "A lime is green."},
]


def _labelled_text(tok, ids, labels):
    return [tok.decode([i]) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_only_assistant_tokens_and_their_end_carry_labels(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = encode_conversation(tok, CONV)
    # The rendered ids are exactly the chat template's (what inference sees).
    assert ids == tok(tok.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]
    labelled = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert labelled == [lab for lab in labels if lab != IGNORE_INDEX]  # labels equal ids where set
    text = tok.decode(labelled)
    assert text == "3 plus 4 is 7.<|end|>A lime is green.<|end|>"
    end = tok.convert_tokens_to_ids("<|end|>")
    # Two assistant turns -> exactly two labelled <|end|>; the system/user <|end|>s carry none.
    assert sum(1 for i, lab in zip(ids, labels) if i == end and lab != IGNORE_INDEX) == 2
    assert sum(1 for i in ids if i == end) == 5  # system, 2 x user, 2 x assistant
    for special in ("<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"):
        sid = tok.convert_tokens_to_ids(special)
        assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == sid)


def test_truncation_is_counted_and_fully_masked_samples_dropped(tiny_tokenizer):
    recs = [ChatRecord(CONV, "a:1"), ChatRecord(CONV[1:3], "a:2")]
    full = encode_records(recs, tiny_tokenizer, 4096)
    assert full.truncated == 0 and len(full.input_ids) == 2
    n_prompt = next(i for i, lab in enumerate(full.labels[1]) if lab != IGNORE_INDEX)
    cut = encode_records(recs, tiny_tokenizer, n_prompt)  # keeps no assistant token of either sample
    assert cut.truncated == 2 and cut.dropped == 2 and cut.input_ids == []
    some = encode_records(recs, tiny_tokenizer, n_prompt + 2)
    assert some.truncated == 2 and all(len(x) <= n_prompt + 2 for x in some.input_ids)
