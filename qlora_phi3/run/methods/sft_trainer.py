"""TRL's SFTTrainer around our pre-tokenized data, with the chunked loss and leak-free packing.

``QLoRATrainer`` changes three things in SFTTrainer. For memory and speed on small cards, the loss is
the chunked cross-entropy of :mod:`qlora_phi3.run.loss` (train and eval: ``prediction_step`` calls
``compute_loss``), and packed batches get their leak-free attention inputs from
:mod:`qlora_phi3.data.packing` right before the forward. And the eval loss is per assistant token over
the whole eval set: the Trainer averages each batch's mean loss weighted by its rows, which weighs a
token in a short answer more than one in a long answer, and would make eval losses depend on how the
rows were batched. Everything else (optimizer, schedule,
mixed precision, gradient accumulation, checkpoint format, distributed data parallel) is the
Trainer's own. ``train``, ``profile`` and ``bench/compare.py`` all step through this class, built by
:func:`qlora_phi3.run.methods.sft.build_trainer` with what every method's trainer shares
(:func:`qlora_phi3.run.methods.base.build_method_trainer`).
"""

from __future__ import annotations

from trl import SFTTrainer

from qlora_phi3.data.packing import to_model_inputs
from qlora_phi3.phi3 import IGNORE_INDEX
from qlora_phi3.run.card import ModelCardMixin
from qlora_phi3.run.checkpoints import AtomicCheckpoints
from qlora_phi3.run.internals import check_trainer_internals
from qlora_phi3.run.loss import model_loss

__all__ = ["QLoRATrainer"]


# AtomicCheckpoints: checkpoints staged then renamed, so a kill never leaves a partial latest (checkpoints.py);
# ModelCardMixin: the run's README.md names the base and the next commands (card.py), not TRL's "[None]".
class QLoRATrainer(ModelCardMixin, AtomicCheckpoints, SFTTrainer):
    def __init__(self, *args, loss_chunk_tokens: int = 256, **kwargs):
        check_trainer_internals(SFTTrainer)
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens
        config = self.model.config
        self._attn = getattr(config, "_attn_implementation", None) or "sdpa"
        self._sliding_window = getattr(config, "sliding_window", None)
        self.tokens_real = 0  # training tokens this session: real ones, and real + padding (what was computed)
        self.tokens_total = 0
        # (eval rows, eval tokens that carry a loss) of the whole eval set: see _per_token_eval_loss.
        self.eval_rows_and_tokens: tuple[int, int] | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_total += inputs["input_ids"].numel()
            self.tokens_real += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else \
                inputs["input_ids"].numel()
        labels = inputs["labels"]
        inputs = to_model_inputs(inputs, self._attn, self._sliding_window)
        evaluating = not model.training and self.accelerator.num_processes == 1
        # Under DDP the backbone must be called through the wrapper's forward (gradient sync): SFTTrainer's own
        # (fused-head) loss. So does a caller that wants logits (prediction_step asks for outputs, but with no
        # compute_metrics it only reads the loss: prediction_loss_only).
        if (not self.loss_chunk_tokens or self.accelerator.num_processes > 1
                or (return_outputs and not (evaluating and self.compute_metrics is None))):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            # The chunked loss calls the backbone itself, past the top-level forward that accelerate wraps in
            # autocast; without this the LoRA layers would see fp32 inputs and run their matmuls in fp32
            # (PEFT casts to the adapter dtype when autocast is off), a slower and bigger path than planned.
            with self.accelerator.autocast():
                loss = model_loss(model, inputs, self.loss_chunk_tokens, num_items_in_batch)
            result = (loss, {"loss": loss}) if return_outputs else loss
        if evaluating and self.eval_rows_and_tokens:
            loss = self._per_token_eval_loss(result[0] if return_outputs else result, labels)
            result = (loss, result[1]) if return_outputs else loss
        return result

    def _per_token_eval_loss(self, batch_mean, labels):
        """The batch's mean loss (per labelled token of the batch), rescaled so that the Trainer's row-weighted
        average of batch losses over the eval set is the mean per labelled token of the whole set:
        (S_b / T_b) * (T_b / B_b) / (T / N), averaged with weights B_b / N, is (sum of all S_b) / T, where S_b is
        batch b's summed loss over its T_b labelled tokens and B_b rows, and the set has T tokens in N rows."""
        rows, tokens = self.eval_rows_and_tokens
        batch_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        return batch_mean * (batch_tokens / labels.shape[0]) * (rows / tokens)
