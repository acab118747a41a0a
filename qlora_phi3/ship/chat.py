"""``qlora-phi3 chat``: talk to a fine-tuned Phi-3 (merged model, adapter on its 4-bit base, or run directory).

The prompt is rendered with the tokenizer's own Phi-3 chat template (the one saved next to the adapter,
so inference formats prompts exactly as training did), tokens are streamed as they are generated, and
generation stops at ``<|end|>`` (end of turn) or ``<|endoftext|>``. Greedy decoding, so an answer is
reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, TextStreamer

from qlora_phi3.errors import UserError
from qlora_phi3.model.load import (auto_tokenizer, hide_load_progress_bars, load_model, load_tokenizer, pick_attention,
                                   pick_compute_dtype, pick_device)
from qlora_phi3.ship.artifacts import check_base, load_adapter, resolve_source
from qlora_phi3.model.generate import greedy_answer, stop_token_ids
from qlora_phi3.ui import console, warn

__all__ = ["ChatModel", "chat", "load_chat_model"]

EXIT_WORDS = ("exit", "quit", "/exit", "/quit")


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    device: str
    stop_ids: list[int]
    description: str


def load_chat_model(path: str, device: str = "auto", base: str | None = None, revision: str | None = None
                    ) -> ChatModel:
    """Load whatever ``path`` holds for generation (see ``artifacts.resolve_source``); ``base`` / ``revision``
    replace the base model an adapter names (e.g. a local copy of it), checked by shapes and revision."""
    hide_load_progress_bars()
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch (check the driver, CUDA_VISIBLE_DEVICES, or "
                        "that a CUDA build of torch is installed); use --device auto or cpu.")
    src = resolve_source(path, base, revision)
    if src.kind == "merged" and (base or revision):
        raise UserError(f"--base/--revision: {path} is a merged model, it has no separate base to replace.")
    dev = pick_device(device).value
    attn = pick_attention("auto", dev).value
    if src.kind == "merged":
        try:
            tokenizer = auto_tokenizer(str(src.path))
            model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype="auto", device_map={"": dev},
                                                         attn_implementation=attn, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot load the model ({str(e).splitlines()[0]}).") from None
        if not tokenizer.chat_template:
            raise UserError(f"{path}: the tokenizer has no chat template; re-run `qlora-phi3 merge` (it saves one).")
        description = f"merged model {src.path} ({model.dtype})"
    else:
        check_base(src)
        has_tokenizer = (src.adapter_dir / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(src.model_cfg, str(src.adapter_dir) if has_tokenizer else None)
        compute = pick_compute_dtype(src.model_cfg.compute_dtype, dev).value
        model = load_adapter(load_model(src.model_cfg, dev, compute, attn), src.adapter_dir)
        description = f"adapter {src.adapter_dir} on 4-bit {src.model_cfg.name_or_path}"
    return ChatModel(model.eval(), tokenizer, dev, stop_token_ids(tokenizer), description)


def _note(msg: str) -> None:
    """Status on stderr, so that stdout carries only the conversation (`chat --prompt ... > answer.txt`)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[dim]{escape(msg)}[/]")


def reply(cm: ChatModel, messages: list[dict], max_new_tokens: int, stream: bool = True) -> str:
    """Generate the assistant's answer to ``messages``, printing it token by token when ``stream``."""
    streamer = TextStreamer(cm.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    answer, ended = greedy_answer(cm.model, cm.tokenizer, messages, max_new_tokens, streamer)
    if not ended:
        # A model that never emits <|end|> was trained without it in the labels (pad == eos masks it out).
        warn(f"stopped at --max-new-tokens={max_new_tokens} without an end-of-turn token.")
    return answer


def chat(path: str, prompt: str | None = None, system: str | None = None, max_new_tokens: int = 256,
         device: str = "auto", base: str | None = None, revision: str | None = None) -> list[dict]:
    """One answer to ``prompt``, or an interactive conversation read from stdin when it is None (ends on
    end of input, an empty line or ``exit``). Returns the conversation."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1.")
    cm = load_chat_model(path, device, base, revision)
    _note(f"{cm.description} on {cm.device}; greedy decoding, stops at <|end|>")
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": reply(cm, messages, max_new_tokens)})
        return messages
    _note("type a message; an empty line, 'exit' or Ctrl-D ends the chat")
    while True:
        try:
            text = console().input("[bold cyan]you>[/] ").strip()
        except EOFError:
            break
        if not text or text.lower() in EXIT_WORDS:
            break
        messages.append({"role": "user", "content": text})
        console().print("[bold green]phi3>[/] ", end="")
        messages.append({"role": "assistant", "content": reply(cm, messages, max_new_tokens)})
    return messages
