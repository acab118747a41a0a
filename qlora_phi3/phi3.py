"""Facts about Phi-3 that every layer relies on: its special tokens, its fused projections, the label
value that carries no loss. One home, so a decision is never written twice."""

__all__ = ["ASSISTANT_TOKEN", "END_TOKEN", "EOT_TOKEN", "IGNORE_INDEX", "PHI3_TARGETS", "STOP_TOKENS",
           "SYSTEM_TOKEN", "USER_TOKEN"]

# Role markers and turn ends of Phi-3's chat format: '<|user|>\n...<|end|>\n<|assistant|>\n...<|end|>\n'.
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"  # closes every turn: the model must learn to emit it, so it carries a label
EOT_TOKEN = "<|endoftext|>"  # eos (id 32000); never the pad token, or the end would be masked out of the loss
STOP_TOKENS = (END_TOKEN, EOT_TOKEN)  # generation stops at either

# Labels with this value carry no loss (PyTorch's cross_entropy ignore_index default, which transformers uses).
IGNORE_INDEX = -100

# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: Llama-style names match nothing.
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
