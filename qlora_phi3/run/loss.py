"""Causal-LM cross-entropy without the full logits.

The plain loss projects every position to the 32,064-token vocabulary and upcasts the result to fp32:
at 2,048 tokens that is 2048 x 32064 x 4 bytes = 263 MB of logits, as much again for their gradient,
plus the bf16 copy (~0.5-0.65 GB in all on Phi-3-mini). Here only positions whose next token carries a
label are projected, ``chunk_tokens`` rows at a time, and each chunk runs under
``torch.utils.checkpoint``: its logits are freed right after its loss is taken and recomputed in
backward. Peak cost: one chunk's bf16 logits, their fp32 copy and its gradient,
256 x 32064 x (2 + 4 + 4) bytes = 82 MB at the default ``train.loss_chunk_tokens=256``.

Why by hand: TRL's fused LM head (``add_fused_lm_head``, which SFTTrainer installs) tiles 4,096 tokens
at a time, so at ``max_seq_len <= 4096`` it still builds the whole sequence's fp32 logits on devices
without Triton, and it cannot be told a smaller tile.
"""

from __future__ import annotations

__all__ = ["backbone_and_head", "chunked_causal_lm_loss", "model_loss"]

from qlora_phi3.phi3 import IGNORE_INDEX


def _chunk_nll_sum(hidden, weight, bias, targets):
    import torch.nn.functional as F

    # Under autocast the projection runs in the compute dtype, like the model's own lm_head; the softmax is fp32.
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(hidden_states, lm_head, labels, chunk_tokens: int = 256, num_items_in_batch=None):
    """Mean next-token cross-entropy over labelled positions, ``chunk_tokens`` positions at a time.

    Args:
        hidden_states: (batch, seq, hidden) final hidden states of the backbone (after the last norm).
        lm_head: the output projection (``nn.Linear``), whose weight may be frozen.
        labels: (batch, seq) token ids, ``-100`` where there is no loss; shifted here as the model does.
        chunk_tokens: rows of logits alive at once.
        num_items_in_batch: divisor (labelled tokens across gradient-accumulation micro-batches), as
            ``Trainer`` passes it; default: the labelled tokens of this batch.

    Returns:
        The scalar loss, equal to ``model(input_ids, labels=labels).loss`` when ``num_items_in_batch`` is None.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:].to(hidden_states.device)
    mask = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][mask]  # (n_labelled, hidden): unlabelled positions are never projected
    targets = targets[mask]
    weight, bias = lm_head.weight, lm_head.bias
    # Start from a graph-connected zero, so a micro-batch without any label still backpropagates (a zero).
    total = hidden_states.sum() * 0.0
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_chunk_nll_sum, hidden[start:stop], weight, bias, targets[start:stop],
                                   use_reentrant=False)
    divisor = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(divisor, device=total.device).clamp(min=1)


def backbone_and_head(model):
    """(backbone, lm_head) of a (PEFT-wrapped) causal LM: the backbone returns hidden states, not logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()  # base_model: Phi3Model, as TRL's fused head uses


def model_loss(model, inputs: dict, chunk_tokens: int, num_items_in_batch=None):
    """Run the backbone on ``inputs`` (labels included) and return the chunked loss."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("num_items_in_batch", None)
    inputs["use_cache"] = False
    backbone, head = backbone_and_head(model)
    hidden = backbone(**inputs).last_hidden_state
    return chunked_causal_lm_loss(hidden, head, labels, chunk_tokens, num_items_in_batch)
