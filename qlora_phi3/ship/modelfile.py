"""The Ollama ``Modelfile`` beside the GGUF files: ``FROM`` the model (and ``ADAPTER`` a GGUF LoRA), the family's chat
template in Ollama's template language, its stop tokens and a context length Ollama can allocate."""

from __future__ import annotations

from qlora_phi3.family import PHI3, TokenizerFamily

__all__ = ["MODELFILE_MAX_CTX", "MODELFILE_NAME", "OLLAMA_TEMPLATE", "OLLAMA_TEMPLATE_NO_NEWLINE", "modelfile_text",
           "ollama_template"]

MODELFILE_NAME = "Modelfile"
# Ollama allocates the whole num_ctx KV cache up front; Phi-3-mini's is 384 KiB per token in f16
# (2 x 32 layers x 32 heads x 96 x 2 bytes), 48 GiB at 128k. Longer contexts are left for the user to raise.
MODELFILE_MAX_CTX = 4096

# Phi-3's chat template (tokenizer_config.json) in Ollama's Go template language: '<|role|>\n' + content +
# '<|end|>\n' per message, then '<|assistant|>\n' when the last message is not the assistant's.
OLLAMA_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}\n"
    "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
    "<|{{ .Role }}|>\n"
    "{{ .Content }}<|end|>\n"
    "{{ if $last }}{{ if ne .Role \"assistant\" }}<|assistant|>\n"
    "{{ end }}{{ end }}\n"
    "{{- end }}"
)


# Phi-4-mini's: the same turns without the newlines ('<|role|>' + content + '<|end|>').
OLLAMA_TEMPLATE_NO_NEWLINE = (OLLAMA_TEMPLATE.replace("|>\n{{ .Content }}<|end|>\n", "|>{{ .Content }}<|end|>")
                              .replace("<|assistant|>\n{{ end }}", "<|assistant|>{{ end }}"))


def ollama_template(family: TokenizerFamily) -> str:
    """The family's chat template in Ollama's language: Phi-3's, Phi-4-mini's without the newlines, Phi-4's with its
    '<|im_start|>ROLE<|im_sep|>' header and '<|im_end|>'."""
    template = OLLAMA_TEMPLATE if family.role_newline else OLLAMA_TEMPLATE_NO_NEWLINE
    return (template.replace("<|{{ .Role }}|>", family.role_header.format(role="{{ .Role }}"))
            .replace("<|assistant|>", family.role_header.format(role="assistant"))
            .replace("<|end|>", family.end_token))


def modelfile_text(gguf_name: str, context_length: int, adapter: str | None = None, from_note: str = "",
                   family: TokenizerFamily = PHI3) -> str:
    """An Ollama Modelfile: ``FROM ./gguf_name``, then ``ADAPTER ./adapter`` (a GGUF LoRA) when given, with
    ``from_note`` (comment lines) above FROM; the family's chat template (:func:`ollama_template`), its stops and a
    context length."""
    num_ctx = min(context_length, MODELFILE_MAX_CTX)
    note = "" if num_ctx == context_length else (
        f"# The model supports {context_length} tokens; Ollama allocates the KV cache for all of num_ctx up front,\n"
        "# so raise it only as far as your memory allows.\n")
    return (f"# Ollama: ollama create NAME -f Modelfile   (written by qlora-phi3 export)\n"
            f"{from_note}FROM ./{gguf_name}\n"
            + (f"ADAPTER ./{adapter}\n" if adapter else "")
            + f'TEMPLATE """{ollama_template(family)}"""\n'
            + "".join(f'PARAMETER stop "{t}"\n' for t in family.stop_tokens)
            + f"{note}PARAMETER num_ctx {num_ctx}\n")

