"""TRL's SFTTrainer around our pre-tokenized data, with the chunked loss and leak-free packing.

``QLoRATrainer`` changes two things in SFTTrainer, both for memory and speed on small cards: the
loss is the chunked cross-entropy of :mod:`qlora_phi3.run.loss` (train and eval, since
``prediction_step`` calls ``compute_loss``), and packed batches get their leak-free attention inputs
from :mod:`qlora_phi3.data.packing` right before the forward. Everything else (optimizer, schedule,
mixed precision, gradient accumulation, checkpoint format, distributed data parallel) is the
Trainer's own. ``train``, ``profile`` and ``bench/compare.py`` all step through this class.
"""

from __future__ import annotations

from datasets import Dataset
from peft.utils.other import fsdp_auto_wrap_policy  # the import PEFT's FSDP guide uses
from transformers import PrinterCallback, ProgressCallback
from trl import SFTTrainer

from qlora_phi3.data.encode import EncodedSplit
from qlora_phi3.data.packing import PackingCollator, pack_columns, to_model_inputs
from qlora_phi3.memory.meter import PeakMemory
from qlora_phi3.run.checkpoints import AtomicCheckpoints
from qlora_phi3.run.internals import check_trainer_internals
from qlora_phi3.run.loss import model_loss
from qlora_phi3.run.progress import RichProgress

__all__ = ["QLoRATrainer", "build_trainer"]


# AtomicCheckpoints: checkpoints staged then renamed, so a kill never leaves a partial latest (checkpoints.py).
class QLoRATrainer(AtomicCheckpoints, SFTTrainer):
    def __init__(self, *args, loss_chunk_tokens: int = 256, **kwargs):
        check_trainer_internals(SFTTrainer)
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens
        config = self.model.config
        self._attn = getattr(config, "_attn_implementation", None) or "sdpa"
        self._sliding_window = getattr(config, "sliding_window", None)
        self.tokens_real = 0  # training tokens this session: real ones, and real + padding (what was computed)
        self.tokens_total = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_total += inputs["input_ids"].numel()
            self.tokens_real += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else \
                inputs["input_ids"].numel()
        inputs = to_model_inputs(inputs, self._attn, self._sliding_window)
        # Under DDP the backbone must be called through the wrapper's forward (gradient sync), and
        # return_outputs wants logits: both go to SFTTrainer's own (fused-head) loss.
        if not self.loss_chunk_tokens or return_outputs or self.accelerator.num_processes > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The chunked loss calls the backbone itself, past the top-level forward that accelerate wraps in
        # autocast; without this the LoRA layers would see fp32 inputs and run their matmuls in fp32
        # (PEFT casts to the adapter dtype when autocast is off), a slower and bigger path than planned.
        with self.accelerator.autocast():
            return model_loss(model, inputs, self.loss_chunk_tokens, num_items_in_batch)


def build_trainer(model, tokenizer, args, train_enc: EncodedSplit, eval_enc: EncodedSplit | None, device: str, *,
                  packing_max_seq_len: int | None = None, loss_chunk_tokens: int = 256, cpu_memory: str = "rss",
                  callbacks: list | None = None):
    """The trainer, its rich progress callback and its memory meter.

    Args:
        packing_max_seq_len: pack the training samples into rows of this many tokens (None: no packing).
            Eval stays unpacked, so eval losses compare across packing on and off.
        loss_chunk_tokens: chunk size of the chunked cross-entropy; 0 = SFTTrainer's own loss.
        cpu_memory: how the meter measures on a CPU (memory.meter.PeakMemory's ``cpu_measure``).
        callbacks: more TrainerCallbacks, run after the progress display.
    """
    meter = PeakMemory(device, cpu_measure=cpu_memory)
    progress = RichProgress(meter)
    if packing_max_seq_len:
        train_dataset = Dataset.from_dict(pack_columns(train_enc.input_ids, train_enc.labels, packing_max_seq_len))
    else:
        train_dataset = train_enc.to_dataset()
    trainer = QLoRATrainer(
        model=model,
        args=args,
        # Pre-tokenized with labels: SFTTrainer keeps our assistant-only labels as they are.
        train_dataset=train_dataset,
        eval_dataset=eval_enc.to_dataset() if eval_enc is not None else None,
        processing_class=tokenizer,
        data_collator=PackingCollator(tokenizer.pad_token_id),
        callbacks=[progress, *(callbacks or [])],
        loss_chunk_tokens=loss_chunk_tokens,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if trainer.is_fsdp_enabled:
        # PEFT's documented FSDP-QLoRA setup: with use_orig_params=False the trainable LoRA weights and the frozen
        # 4-bit weights must land in different flat parameters, so they are wrapped apart.
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    # SFTTrainer casts LoRA weights of a quantized model to bf16, whatever the compute dtype. Keep them fp32:
    # fp16 loss scaling needs fp32 master weights, and bf16 weights drop updates below 1/256 of their size.
    # Done before train() builds the optimizer, so its states are fp32-shaped too.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return trainer, progress, meter
