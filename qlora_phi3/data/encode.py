"""Turning conversations into training tensors: Phi-3 chat template, assistant-only labels, truncation, split.

Why not TRL's ``assistant_only_loss``: it needs ``{% generation %}`` markers in the chat template,
which Phi-3's own template lacks (without them the mask silently covers everything or nothing).
We render with the model's own template, tokenize the whole text once (exactly what inference sees),
and label by walking the token ids: loss on every token after the reply header (the generation prompt's
tokens: ``<|assistant|>`` and whatever the tokenizer leaves after it, e.g. a newline; Phi-4's
``<|im_start|>assistant<|im_sep|>``) up to and including the end-of-turn token that closes the reply (``<|end|>``;
Phi-4: ``<|im_end|>``). Character spans cannot do this: Phi-3's role tokens swallow the whitespace after them
(``rstrip``), so a reply starting with a newline overlaps ``<|assistant|>``.

A reply holding the text of a Phi-3 special token (``<|end|>``, ...) would be tokenized as that token and
end the span early; ``data.read`` rejects such records (with file:line), and the encoder refuses a message
holding any added token's text, or tokens that do not match the turns, rather than label it wrongly.

Reasoning models (Phi-4-reasoning, Phi-4-mini-reasoning) answer with a ``<think>...</think>`` block before the
solution, inside the assistant turn; their templates keep it there in every turn. So the block is part of the reply and
carries loss: it is what the model generates and must learn to write. ``<think>`` / ``</think>`` may be added tokens of
such a tokenizer, and are the one exception to the guard above, in assistant messages only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from qlora_phi3.data.read import ChatRecord
from qlora_phi3.errors import UserError
from qlora_phi3.family import THINK_TOKENS, family_for_tokenizer
from qlora_phi3.phi3 import IGNORE_INDEX

__all__ = ["EncodedSplit", "encode_conversation", "encode_records", "renders_system_messages", "reply_markers"]


def reply_markers(tokenizer) -> tuple[list[int], int, tuple[str, ...]]:
    """(ids of the reply header, id of the end-of-turn token, texts of the added tokens).

    The header is what the template's generation prompt adds: what inference feeds before the answer, so it never
    carries loss. Phi-3: the one token ``<|assistant|>`` (the newline is swallowed; a tokenizer without ``rstrip``
    leaves ``▁`` and ``\\n`` tokens after it); Phi-4-mini: ``<|assistant|>``; Phi-4: ``<|im_start|>``, the plain-text
    role ``assistant`` and ``<|im_sep|>``, so the walk matches the whole header, never one role token. The end of turn
    is the family's (``<|end|>``, Phi-4's ``<|im_end|>``)."""
    family = family_for_tokenizer(tokenizer)
    end = tokenizer.convert_tokens_to_ids(family.end_token)
    if end in (None, tokenizer.unk_token_id) or not tokenizer.chat_template:
        raise UserError(f"the tokenizer has no {family.end_token} token or no chat template; it is not a Phi "
                        "chat tokenizer.")
    probe = [{"role": "user", "content": "Hi"}]
    with_prompt, without = (tokenizer(tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=g),
                                      add_special_tokens=False)["input_ids"] for g in (True, False))
    header = with_prompt[len(os.path.commonprefix([with_prompt, without])):]
    if not header or "assistant" not in tokenizer.decode(header):
        raise UserError("the tokenizer's chat template does not open the generation prompt with an assistant "
                        f"header (it adds {tokenizer.decode(header)!r}); it is not a Phi chat template.")
    added = tuple(sorted({str(t) for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True))
    return header, end, added


def encode_conversation(tokenizer, messages: list[dict], markers=None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels that are -100 except on assistant replies
    and their closing end-of-turn token (every assistant turn, not just the last). ``markers``: ``reply_markers``
    of the tokenizer, when encoding many conversations."""
    header, end, added = markers or reply_markers(tokenizer)
    for i, m in enumerate(messages):  # data.read rejects these first; a guard for other tokenizers and callers
        allowed = THINK_TOKENS if m["role"] == "assistant" else ()  # a reasoning reply writes its own think block
        token = next((t for t in added if t in m["content"] and t not in allowed), None)
        if token:
            raise UserError(f"message {i} ({m['role']}) contains {token!r}, which the tokenizer reads as a special "
                            "token, not as text: it would end or shift the loss span. Remove it from the data.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    replies, i, n = 0, 0, len(header)
    while i < len(ids):
        if ids[i:i + n] != header:
            i += 1
            continue
        start = i + n
        try:
            stop = ids.index(end, start)
        except ValueError:
            raise UserError(f"an assistant reply is not closed by {tokenizer.convert_ids_to_tokens(end)}; the chat "
                            "template is not the model's own.") from None
        labels[start:stop + 1] = ids[start:stop + 1]
        replies += 1
        i = stop + 1
    expected = sum(1 for m in messages if m["role"] == "assistant")
    if replies != expected:
        _refuse_dropped_message(messages, text)
        raise UserError(f"found {replies} assistant replies in the tokens but the conversation has {expected} "
                        "assistant turns; the chat template is not the model's own (or its reply header "
                        f"{tokenizer.decode(header)!r} is tokenized differently inside the conversation).")
    return ids, labels


def _refuse_dropped_message(messages: list[dict], text: str) -> None:
    """Name the message the chat template did not render at all, when one is missing: a template can drop turns
    (a copy of Phi-4-reasoning's template in circulation, unsloth's, writes its fixed system prompt in place of every
    message of a conversation that starts with a system message), and 'the template is not the model's own' would
    then mislead."""
    for i, m in enumerate(messages):
        # A system turn may be left out by design (Phi-4-reasoning's template writes its own): only turns count.
        if m["role"] != "system" and m["content"].strip() and m["content"].strip() not in text:
            hint = (" It starts with a system message, which a template with its own system prompt (a copy of"
                    " Phi-4-reasoning's does) can render in place of the turns: remove the system message from the"
                    " data."
                    if messages[0]["role"] == "system" else " Check that the tokenizer's template is the model's own.")
            raise UserError(f"the model's chat template does not render message {i} ({m['role']}) of this "
                            f"conversation, so its replies cannot be labelled.{hint}")


@dataclass
class EncodedSplit:
    input_ids: list[list[int]]
    labels: list[list[int]]
    origins: list[str]
    truncated: int = 0  # samples cut to max_seq_len
    dropped: int = 0  # samples with no labelled token left after truncation
    assistant_tokens_lost: int = 0  # labelled (assistant) tokens cut off by truncation

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        return sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in self.labels)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, lab in zip(self.input_ids, self.labels):
            h.update(repr((ids, lab)).encode())
        return h.hexdigest()[:16]

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})


def renders_system_messages(tokenizer) -> bool:
    """Whether the chat template writes a system message's content. Phi-4-reasoning's published template does not:
    it writes its own fixed system prompt and ignores a system turn."""
    from jinja2 import TemplateError

    probe = "qlora-phi3 probe of the system turn"
    messages = [{"role": "system", "content": probe}, {"role": "user", "content": "Hi"}]
    try:
        return probe in tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:  # a template that refuses the system role (raise_exception) does not render it either
        return False


def encode_records(records: list[ChatRecord], tokenizer, max_seq_len: int) -> EncodedSplit:
    out = EncodedSplit([], [], [])
    markers = reply_markers(tokenizer)
    with_system = sum(1 for rec in records if any(m["role"] == "system" for m in rec.messages))
    if with_system and not renders_system_messages(tokenizer):
        from qlora_phi3.ui import warn

        # Not an error: the model runs with the same template, so it never sees a system turn either.
        warn(f"{with_system} of {len(records)} conversations have a system message, which the model's chat template "
             "does not render (it writes its own system prompt): they train without it, as the model will run.")
    for rec in records:
        try:
            ids, labels = encode_conversation(tokenizer, rec.messages, markers)
        except UserError as e:
            raise UserError(f"{rec.origin}: {e}") from None
        if len(ids) > max_seq_len:
            out.truncated += 1
            out.assistant_tokens_lost += sum(1 for t in labels[max_seq_len:] if t != IGNORE_INDEX)
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(t == IGNORE_INDEX for t in labels):
                out.dropped += 1
                continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.origins.append(rec.origin)
    return out
