"""Labels on the real Phi-3 tokenizer: loss on exactly the tokens after each <|assistant|> up to and including the
<|end|> closing that reply, whatever the whitespace; checked token by token against an independent walk."""

import itertools

import pytest

from qlora_phi3.data.encode import encode_conversation, encode_records
from qlora_phi3.data.read import PHI3_TOKEN_TEXTS, ChatRecord, turn_problem
from qlora_phi3.errors import UserError
from qlora_phi3.phi3 import IGNORE_INDEX

CONV = [
    {"role": "system", "content": "You are a quiz bot."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "What color is a lime?"},
    {"role": "assistant", "content": "A lime is green."},
]
ASSISTANT, END, USER, SYSTEM, EOT = 32001, 32007, 32010, 32006, 32000

# Replies that broke character-span labels on the real tokenizer (Phi-3's role tokens swallow whitespace).
REPLIES = {
    "newline first": "\nThe answer is 7.",
    "two newlines first": "\n\nThe answer is 7.",
    "spaces first": "   The answer is 7.",
    "tab first": "\tThe answer is 7.",
    "trailing whitespace": "The answer is 7. \n\t ",
    "code fence": "```python\ndef add(a, b):\n    return a + b\n```\n",
    "emoji and accents": "Ça marche ! 🎉👍🏽 naïve café, 日本語 😶‍🌫️",
    "only punctuation": "?!...",
    "digits": "0 plus 0 is 0.",
}


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_labels(tok, messages):
    """Independent of encode.py's walk: the reply of assistant turn i spans from the end of the tokens of
    the prompt inference would see (the conversation so far + the generation prompt) to the end of the
    tokens of the conversation through turn i (which ends in that turn's <|end|>)."""
    full = _ids(tok, tok.apply_chat_template(messages, tokenize=False))
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _ids(tok, tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert through.endswith(tok.eos_token)
        through = _ids(tok, through[: -len(tok.eos_token)])
        assert full[: len(prompt)] == prompt and full[: len(through)] == through  # tokens do not merge across
        assert through[-1] == END and prompt[-1] == ASSISTANT
        labels[len(prompt): len(through)] = full[len(prompt): len(through)]
    return full, labels


def _check(tok, messages):
    ids, labels = encode_conversation(tok, messages)
    want_ids, want_labels = expected_labels(tok, messages)
    assert ids == want_ids
    for pos, (got, want) in enumerate(zip(labels, want_labels)):  # token by token, for a readable failure
        assert got == want, (pos, tok.convert_ids_to_tokens(ids[pos]), got, want)
    assert len(labels) == len(want_labels)
    for special in (ASSISTANT, USER, SYSTEM, EOT):
        assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == special)
    n_replies = sum(1 for m in messages if m["role"] == "assistant")
    assert sum(1 for i, lab in zip(ids, labels) if i == END and lab != IGNORE_INDEX) == n_replies
    return ids, labels


def _spans(ids, labels):
    """The labelled runs of ids."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_two_turns_with_system(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = _check(tok, CONV)
    assert [tok.decode(span) for span in _spans(ids, labels)] == ["3 plus 4 is 7.<|end|>", "A lime is green.<|end|>"]
    assert sum(1 for i in ids if i == END) == 5  # system, 2 x user, 2 x assistant; only 2 labelled
    assert ids[-1] == EOT and labels[-1] == IGNORE_INDEX


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_reply_shapes(tiny_tokenizer, name):
    tok, reply = tiny_tokenizer, REPLIES[name]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    ids, labels = _check(tok, messages)
    (span,) = _spans(ids, labels)
    assert span[-1] == END and ASSISTANT not in span
    # Phi-3's <|assistant|> swallows the reply's leading whitespace; everything after it is learned.
    assert tok.decode(span[:-1]) == reply.lstrip()


def test_sixty_varied_conversations(tiny_tokenizer):
    """Multi-turn, with and without system turns, every reply shape in every position."""
    replies = list(REPLIES.values())
    convs = []
    for k, (first, second) in enumerate(itertools.islice(itertools.product(replies, replies), 60)):
        msgs = [{"role": "system", "content": " You answer.\n"}] if k % 3 == 0 else []
        msgs += [{"role": "user", "content": "\tQ1 "}, {"role": "assistant", "content": first}]
        if k % 2:
            msgs += [{"role": "user", "content": "\nQ2"}, {"role": "assistant", "content": second}]
        convs.append(msgs)
    for msgs in convs:
        _check(tiny_tokenizer, msgs)


def test_special_token_text_in_a_reply_is_rejected_not_mislabelled(tiny_tokenizer):
    """A reply holding "<|end|>" would tokenize as the end token and end the span early: the data validation
    rejects it with a reason naming the token, and the encoder refuses it rather than mislabel it."""
    for token in PHI3_TOKEN_TEXTS:
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": f"Write {token} here."}]
        assert str(turn_problem(msgs)) == (f"special token in text: message 1 (assistant) contains {token!r}, which "
                                           "Phi-3's tokenizer reads as a control token, not as text; remove it")
    for msgs in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Stop <|end|> here."}],
                 [{"role": "user", "content": "Say <|assistant|>"}, {"role": "assistant", "content": "No."}]):
        bad = 1 if "<|end|>" in msgs[1]["content"] else 0
        token = "<|end|>" if bad else "<|assistant|>"
        with pytest.raises(UserError, match=rf"message {bad} \({msgs[bad]['role']}\) contains '{token}'.*Remove it"):
            encode_conversation(tiny_tokenizer, msgs)
    with pytest.raises(UserError, match=r"^chats.jsonl:7: message 1 \(assistant\) contains '<\|end\|>'"):
        bad = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Stop <|end|> here."}]
        encode_records([ChatRecord(CONV, "chats.jsonl:1"), ChatRecord(bad, "chats.jsonl:7")], tiny_tokenizer, 4096)


def test_truncation_is_counted_and_fully_masked_samples_dropped(tiny_tokenizer):
    recs = [ChatRecord(CONV, "a:1"), ChatRecord(CONV[1:3], "a:2")]
    full = encode_records(recs, tiny_tokenizer, 4096)
    assert full.truncated == 0 and len(full.input_ids) == 2
    n_prompt = next(i for i, lab in enumerate(full.labels[1]) if lab != IGNORE_INDEX)
    cut = encode_records(recs, tiny_tokenizer, n_prompt)  # keeps no assistant token of either sample
    assert cut.truncated == 2 and cut.dropped == 2 and cut.input_ids == []
    some = encode_records(recs, tiny_tokenizer, n_prompt + 2)
    assert some.truncated == 2 and all(len(x) <= n_prompt + 2 for x in some.input_ids)
