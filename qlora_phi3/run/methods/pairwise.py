"""ORPO and SimPO: preference pairs in one pass, without a reference model (TRL's ORPOTrainer and CPOTrainer).

Both TRL trainers tokenize text themselves (adding a BOS and ``<|endoftext|>`` that Phi-3's chat template does
not use) and score answers from the model's full logits. Two overrides, each for that reason:

* ``tokenize_row`` passes through the pairs :mod:`qlora_phi3.data.preference` tokenized with Phi-3's template;
* ``concatenated_forward`` scores chosen and rejected with :func:`qlora_phi3.run.logprobs.answer_logprobs`
  (label-only, chunked) instead of the full (2 x micro-batch, seq, 32,064) logits. The SFT term of ORPO is
  then the mean NLL over the chosen *answer* tokens, as in the ORPO paper (TRL's own also counts the prompt).
  ``train.loss_chunk_tokens=0`` keeps TRL's forward, for comparison.
"""

from __future__ import annotations

from qlora_phi3.phi3 import IGNORE_INDEX
from qlora_phi3.run.methods.base import MethodData, TokenCounting, build_method_trainer

__all__ = ["build_pairwise_trainer", "pairwise_trainer_class"]


def pairwise_trainer_class(base):
    """``base`` (ORPOTrainer or CPOTrainer) with our data, label-only log-probs, atomic checkpoints and counts."""
    from qlora_phi3.run.card import ModelCardMixin
    from qlora_phi3.run.checkpoints import AtomicCheckpoints
    from qlora_phi3.run.internals import check_trainer_internals
    from qlora_phi3.run.logprobs import answer_logprobs
    from qlora_phi3.run.loss import backbone_and_head

    class PairwiseTrainer(TokenCounting, ModelCardMixin, AtomicCheckpoints, base):
        _ROW_KEYS = ("chosen_", "rejected_")

        def __init__(self, *args, loss_chunk_tokens: int = 256, average_log_prob: bool = True, **kwargs):
            check_trainer_internals(base)
            self.loss_chunk_tokens = loss_chunk_tokens
            self.average_log_prob = average_log_prob  # ORPO and SimPO score an answer by its mean token log-prob
            super().__init__(*args, **kwargs)

        def tokenize_row(self, feature, model=None):
            prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side, answer in (("chosen", chosen), ("rejected", rejected)):
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
            return row

        def concatenated_forward(self, model, batch):
            if not self.loss_chunk_tokens:
                return super().concatenated_forward(model, batch)
            pad = getattr(self, "padding_value", None)
            pad = self.pad_token_id if pad is None else pad
            cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad,
                                           device=self.accelerator.device)
            n_chosen = batch["chosen_labels"].shape[0]
            backbone, head = backbone_and_head(model)
            # The backbone is called below the top-level forward that accelerate wraps in autocast, so autocast is
            # opened again here (docs/pitfalls.md).
            with self.accelerator.autocast():
                hidden = backbone(input_ids=cat["concatenated_input_ids"],
                                  attention_mask=cat["concatenated_attention_mask"], use_cache=False).last_hidden_state
                log_probs, _, mean_logits, _, mask = answer_logprobs(hidden, head, cat["concatenated_labels"],
                                                                     self.loss_chunk_tokens)
            sums, counts = log_probs.sum(-1), mask.sum(-1)
            scores = sums / counts.clamp(min=1) if self.average_log_prob else sums
            nll = -sums[:n_chosen].sum() / counts[:n_chosen].sum().clamp(min=1)
            # TRL only logs the mean of the logits it gets back; the mean logit per answer token stands in for them.
            return scores[:n_chosen], scores[n_chosen:], mean_logits[:n_chosen], mean_logits[n_chosen:], nll

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._count_tokens(model, inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return PairwiseTrainer


def build_pairwise_trainer(base, model, tokenizer, args, data: MethodData, device: str, *,
                           average_log_prob: bool = True, **kwargs):
    return build_method_trainer(pairwise_trainer_class(base), model, tokenizer, args, data, device, **kwargs,
                                    reference=lambda m: "none (reference-free method)",
                                    average_log_prob=average_log_prob)
