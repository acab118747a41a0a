"""Facts shared by every supported Phi (Phi-3-mini, Phi-3.5-mini, Phi-3-medium, Phi-4-mini): the *texts* of the
role and end tokens, the fused projection names, the label value that carries no loss. One home, so a decision is
never written twice. What differs per model (token ids, vocabulary, template, pad, config facts) is data in
qlora_phi3/family.py, and code asks the model's own tokenizer and config for it."""

__all__ = ["ASSISTANT_TOKEN", "END_TOKEN", "EOT_TOKEN", "IGNORE_INDEX", "PHI3_TARGETS"]

# The assistant's role marker and the turn ends: Phi-3's '<|user|>\n...<|end|>\n<|assistant|>\n', Phi-4-mini's without
# the newlines. Generation stops at the family's stop tokens (family.py).
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"  # closes every turn: the model must learn to emit it, so it carries a label
EOT_TOKEN = "<|endoftext|>"  # eos (Phi-3: 32000; Phi-4-mini: 199999, also its pad: family.py says why that is safe)

# Labels with this value carry no loss (PyTorch's cross_entropy ignore_index default, which transformers uses).
IGNORE_INDEX = -100

# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: Llama-style names match nothing.
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
