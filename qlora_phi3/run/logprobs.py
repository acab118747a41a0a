"""Per-token log-probabilities of the answer tokens without the full logits: the preference methods' head.

DPO, KTO, ORPO and SimPO all score each answer by the sum (or mean) of log p(token) over its tokens. TRL builds
those log-probs in two ways, both too big for a small card:

* DPOTrainer and KTOTrainer install TRL's fused LM head (``add_fused_lm_head``), which projects 4,096 positions
  at a time against the whole vocabulary: at <= 4,096 tokens per micro-batch (chosen + rejected rows) that is one
  tile of every position's logits, 4096 x 32064 x 2 bytes = 263 MB in bf16. Without Triton (CPUs) it scores every
  position, prompt and padding included, and folds each tile in fp32 (another 525 MB and its exp()).
* ORPOTrainer and CPOTrainer (SimPO) call the model's forward and take ``.logits``: the full (rows, seq, 32064)
  logits, upcast to fp32 for the log-softmax, plus their gradient.

Here only positions whose next token is an answer token are projected, ``chunk_tokens`` rows at a time, each
chunk under ``torch.utils.checkpoint`` so its logits are freed right after and rebuilt in backward, the same
scheme as the SFT loss (:mod:`qlora_phi3.run.loss`), and log p(token) is minus the same fused cross-entropy:
256 x 32064 x (2 + 4 + 4) bytes = 82 MB at the default ``train.loss_chunk_tokens=256``, whatever the sequence
length. The entropy, mean logit and top-1 hit TRL logs come from the same chunk, without gradient. Measured on a
mini Phi-3 (real vocabulary, 2 rows of 384 tokens, CPU live tensors): a training step's peak 0.118 GiB this way,
0.736 GiB with TRL's fused head (``train.loss_chunk_tokens=0``).
"""

from __future__ import annotations

import functools
import types

from qlora_phi3.phi3 import IGNORE_INDEX

__all__ = ["answer_logprobs", "install_label_logprobs"]


def _chunk_stats(hidden, weight, bias, targets):
    import torch
    import torch.nn.functional as F

    # Under autocast the projection runs in the compute dtype, like the model's own lm_head; the softmax is fp32.
    logits = F.linear(hidden, weight, bias).float()
    # log p(target) as minus the per-token cross-entropy: its fused backward (softmax minus one-hot, in one buffer)
    # costs what the SFT loss costs; logsumexp + gather would keep a scattered gradient and an exp() beside it.
    logp = -F.cross_entropy(logits, targets, reduction="none")
    with torch.no_grad():  # logging only (TRL's entropy, logits/chosen, mean_token_accuracy)
        detached = logits.detach()
        log_z = torch.logsumexp(detached, dim=-1)
        # One fp32 buffer, worked in place: p, then p * logit.
        weighted = (detached - log_z.unsqueeze(-1)).exp_().mul_(detached)
        entropy = log_z - weighted.sum(-1)
        del weighted
        mean_logit = detached.mean(-1)
        is_top1 = detached.argmax(-1) == targets
    return logp, entropy, mean_logit, is_top1


def answer_logprobs(hidden_states, lm_head, labels, chunk_tokens: int = 256):
    """Per-token log-probs of ``labels`` (shifted: position t scores token t+1), 0 where the label is -100.

    Args:
        hidden_states: (rows, seq, hidden) final hidden states (after the last norm).
        lm_head: the output projection.
        labels: (rows, seq) token ids, -100 outside the answers.
        chunk_tokens: labelled positions projected at once.

    Returns:
        (log_probs, entropy, mean_logits, is_top1, mask), each (rows, seq - 1); only ``log_probs`` has a gradient.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:].to(hidden_states.device)
    mask = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][mask]  # (n_answer_tokens, hidden): prompt and padding are never projected
    targets = targets[mask]
    weight, bias = lm_head.weight, lm_head.bias
    parts = [[], [], [], []]
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        for acc, out in zip(parts, checkpoint(_chunk_stats, hidden[start:stop], weight, bias, targets[start:stop],
                                              use_reentrant=False)):
            acc.append(out)
    # masked_scatter keeps the result connected to the graph even when no label is valid (a differentiable zero).
    base = hidden_states.new_zeros(mask.shape, dtype=torch.float32)
    if not parts[0]:
        zero = base + hidden_states.sum() * 0.0
        return zero, base.clone(), base.clone(), mask.clone(), mask
    log_probs = base.masked_scatter(mask, torch.cat(parts[0]))
    entropy = base.detach().masked_scatter(mask, torch.cat(parts[1]))
    mean_logits = base.detach().masked_scatter(mask, torch.cat(parts[2]))
    is_top1 = torch.zeros_like(mask).masked_scatter(mask, torch.cat(parts[3]))
    return log_probs, entropy, mean_logits, is_top1, mask


def install_label_logprobs(model, chunk_tokens: int, temperature: float = 1.0) -> None:
    """Make ``model(..., labels=L, fused_lm_head=True)`` (the call DPOTrainer and KTOTrainer make) return TRL's
    ``FusedCausalLMOutput`` from :func:`answer_logprobs` instead of TRL's 4,096-position tiles. ``model`` is the
    causal LM inside the PEFT wrapper, after TRL installed its own fused head (which a call without
    ``fused_lm_head`` still reaches, for generation). ``temperature``: GRPO scores its sampled completions at the
    temperature they were sampled at, as TRL's head does (logits / T)."""
    from trl.trainer.utils import FusedCausalLMOutput

    if temperature != 1.0 and getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError("a temperature needs an LM head without bias (Phi-3's has none)")

    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or kwargs.get("shift_labels") is not None:
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # Phi3Model: the backbone, as TRL's head uses
        if temperature != 1.0:  # W h / T = W (h / T): no bias, so the scaled logits without a second (N, V) tensor
            hidden = hidden / temperature
        log_probs, entropy, mean_logits, is_top1, mask = answer_logprobs(hidden, self.get_output_embeddings(), labels,
                                                                         chunk_tokens)
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / divisor, log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
