"""Turning conversations into training tensors: Phi-3 chat template, assistant-only labels, truncation, split.

Why not TRL's ``assistant_only_loss``: it needs ``{% generation %}`` markers in the chat template,
which Phi-3's own template lacks (without them the mask silently covers everything or nothing).
We render with the model's own template and label by character spans instead, so the tokens are
exactly what inference will see.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from qlora_phi3.data.read import ChatRecord
from qlora_phi3.errors import UserError
from qlora_phi3.phi3 import END_TOKEN, IGNORE_INDEX

__all__ = ["EncodedSplit", "encode_conversation", "encode_records"]



def _assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant reply plus the ``<|end|>`` that closes it."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        start = len(prefix)
        stop = start + len(m["content"])
        if not text.startswith(prefix) or text[start:stop] != m["content"] or not text.startswith(END_TOKEN, stop):
            raise UserError("the tokenizer's chat template does not render assistant turns as "
                            f"'<|assistant|>\\n' + content + '{END_TOKEN}'; it is not Phi-3's template.")
        spans.append((start, stop + len(END_TOKEN)))
    return spans


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels that are -100 except on assistant replies
    and their closing ``<|end|>`` (every assistant turn, not just the last)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = any(s < end and e > start for start, end in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return ids, labels


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


def encode_records(records: list[ChatRecord], tokenizer, max_seq_len: int) -> EncodedSplit:
    out = EncodedSplit([], [], [])
    for rec in records:
        ids, labels = encode_conversation(tokenizer, rec.messages)
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
