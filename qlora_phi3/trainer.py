"""Building TRL's SFTTrainer around our pre-tokenized data, display and memory meter."""

from __future__ import annotations

__all__ = ["build_trainer"]


def _trainer_class():
    from trl import SFTTrainer

    from .checkpoints import AtomicCheckpoints

    class QloraTrainer(AtomicCheckpoints, SFTTrainer):
        """TRL's SFTTrainer plus what it cannot do: atomic checkpoints (see checkpoints.py)."""

    return QloraTrainer


def build_trainer(model, tokenizer, args, train_enc, eval_enc, device: str):
    from transformers import PrinterCallback, ProgressCallback

    from .memory import PeakMemory
    from .progress import RichProgress

    meter = PeakMemory(device)
    progress = RichProgress(meter)
    trainer = _trainer_class()(
        model=model,
        args=args,
        # Pre-tokenized with labels: SFTTrainer keeps our assistant-only labels as they are.
        train_dataset=train_enc.to_dataset(),
        eval_dataset=eval_enc.to_dataset(),
        processing_class=tokenizer,
        callbacks=[progress],
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
