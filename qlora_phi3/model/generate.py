"""Generation, in one place: the greedy answer that sample answers during training (run/samples.py) and
``qlora-phi3 chat`` (ship/chat.py) both give, with the model's own chat template and stop tokens."""

from __future__ import annotations

import torch

from qlora_phi3.family import family_for_tokenizer

__all__ = ["greedy_answer", "stop_token_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's own ids of its family's stop tokens, ``<|end|>`` (closes every turn) and ``<|endoftext|>``
    (Phi-3: 32007, 32000; Phi-4-mini: 200020, 199999): generation must stop at either."""
    return [tokenizer.convert_tokens_to_ids(t) for t in family_for_tokenizer(tokenizer).stop_tokens]


def greedy_answer(model, tokenizer, messages: list[dict], max_new_tokens: int, streamer=None) -> tuple[str, bool]:
    """The assistant's greedy answer to ``messages`` (Phi-3 chat template, generation prompt) and whether it ended
    with an end token (False: cut by ``max_new_tokens``)."""
    stop_ids = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    ended = bool(new) and new[-1] in stop_ids
    return tokenizer.decode(new, skip_special_tokens=True).strip(), ended
