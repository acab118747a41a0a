"""Building TRL's SFTTrainer around our pre-tokenized data, display and memory meter."""

from __future__ import annotations

__all__ = ["build_trainer"]


def build_trainer(model, tokenizer, args, train_enc, eval_enc, device: str):
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    from .memory import PeakMemory
    from .progress import RichProgress

    meter = PeakMemory(device)
    progress = RichProgress(meter)
    trainer = SFTTrainer(
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
    return trainer, progress, meter
