"""Building TRL's SFTTrainer around our pre-tokenized data, display and memory meter.

``QLoRATrainer`` changes two things in SFTTrainer, both for memory and speed on small cards:
the loss is the chunked cross-entropy of :mod:`qlora_phi3.run.loss` (train and eval, since
``prediction_step`` calls ``compute_loss``), and packed batches get their leak-free attention inputs
from :mod:`qlora_phi3.data.packing` right before the forward.
"""

from __future__ import annotations

__all__ = ["build_trainer", "make_trainer_class"]


def make_trainer_class():
    """SFTTrainer subclass (built lazily so that importing this module does not import TRL)."""
    from trl import SFTTrainer

    from qlora_phi3.run.checkpoints import AtomicCheckpoints
    from qlora_phi3.run.loss import model_loss
    from qlora_phi3.data.packing import to_model_inputs

    # AtomicCheckpoints: checkpoints staged then renamed, so a kill never leaves a partial latest (checkpoints.py).
    class QLoRATrainer(AtomicCheckpoints, SFTTrainer):
        def __init__(self, *args, loss_chunk_tokens: int = 256, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_chunk_tokens = loss_chunk_tokens
            config = self.model.config
            self._attn = getattr(config, "_attn_implementation", None) or "sdpa"
            self._sliding_window = getattr(config, "sliding_window", None)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            n_real_tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
            inputs = to_model_inputs(inputs, self._attn, self._sliding_window)
            # Under DDP the backbone must be called through the wrapper's forward (gradient sync), and
            # return_outputs wants logits: both go to SFTTrainer's own (fused-head) loss.
            if not self.loss_chunk_tokens or return_outputs or self.accelerator.num_processes > 1:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = model_loss(model, inputs, self.loss_chunk_tokens, num_items_in_batch)
            mode = "train" if model.training else "eval"
            if mode == "train":  # the num_tokens metric SFTTrainer keeps
                self._total_train_tokens += int(n_real_tokens)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return QLoRATrainer


def build_trainer(model, tokenizer, args, train_enc, eval_enc, device: str, *, packing_max_seq_len: int | None = None,
                  loss_chunk_tokens: int = 256, cpu_memory: str = "rss"):
    """The trainer, its rich progress callback and its memory meter.

    Args:
        packing_max_seq_len: pack the training samples into rows of this many tokens (None: no packing).
            Eval stays unpacked, so eval losses compare across packing on and off.
        loss_chunk_tokens: chunk size of the chunked cross-entropy; 0 = SFTTrainer's own loss.
        cpu_memory: how the meter measures on a CPU (memory.PeakMemory's ``cpu_measure``).
    """
    from transformers import PrinterCallback, ProgressCallback

    from qlora_phi3.memory.meter import PeakMemory
    from qlora_phi3.data.packing import PackingCollator, pack_columns
    from qlora_phi3.run.progress import RichProgress

    # On CPU, training shows sampled RSS by default: the live-tensor tracker costs ~2.6x CPU time on small ops.
    meter = PeakMemory(device, cpu_measure=cpu_memory)
    progress = RichProgress(meter)
    if packing_max_seq_len:
        from datasets import Dataset

        train_dataset = Dataset.from_dict(pack_columns(train_enc.input_ids, train_enc.labels, packing_max_seq_len))
    else:
        train_dataset = train_enc.to_dataset()
    trainer = make_trainer_class()(
        model=model,
        args=args,
        # Pre-tokenized with labels: SFTTrainer keeps our assistant-only labels as they are.
        train_dataset=train_dataset,
        eval_dataset=eval_enc.to_dataset(),
        processing_class=tokenizer,
        data_collator=PackingCollator(tokenizer.pad_token_id),
        callbacks=[progress],
        loss_chunk_tokens=loss_chunk_tokens,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    # SFTTrainer casts LoRA weights of a quantized model to bf16, whatever the compute dtype. Keep them fp32:
    # fp16 loss scaling needs fp32 master weights, and bf16 weights drop updates below 1/256 of their size.
    # Done before train() builds the optimizer, so its states are fp32-shaped too.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return trainer, progress, meter
