"""What every training method shares: the Trainer arguments, the data a method hands the run, token counts.

A method (:mod:`qlora_phi3.run.methods`) supplies its data encoding, its trainer and its estimator terms; the
run itself (run directory, resume, run.json, guards, trackers, sample answers, OOM advice, adapter) is one path
in :mod:`qlora_phi3.run.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qlora_phi3.config import Recipe
from qlora_phi3.methods import METHODS
from qlora_phi3.run.offload import checkpointing_kwargs
from qlora_phi3.run.preflight import trackers

__all__ = ["MethodData", "TokenCounting", "build_method_trainer", "common_arguments", "eval_fields_of",
           "keep_lora_fp32", "report_splits"]


@dataclass
class MethodData:
    train: object  # the encoded training split: fingerprint(), n_tokens
    eval: object
    eval_records: list  # held-out conversations (ChatRecord) whose answer the sample prompts ask for
    dataset: dict  # run.json's "dataset" fields beyond source and fingerprints
    padded_share: float | None = None
    notes: list = field(default_factory=list)


def report_splits(splits) -> None:
    """Say what reading and splitting the data decided, alike for every method: the records skipped (with why),
    the reader's notes, and the split's (an ignored eval split, eval records dropped as overlap) as warnings."""
    from qlora_phi3.ui import info, warn

    report = splits.report
    if report.n_skipped:
        warn(f"skipped {report.n_skipped} of {report.total} records in {report.source}:")
        for line in report.summary_lines():
            info(f"  {line}")
    for note in report.notes:
        info(f"data: {note}")
    for note in splits.notes:
        warn(note)


def common_arguments(recipe: Recipe, output_dir: Path, device: str, compute_dtype: str, measuring: bool) -> dict:
    """Keyword arguments of transformers' TrainingArguments (so of every TRL config) that every method sets alike."""
    t = recipe.train
    return dict(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of total steps in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        activation_checkpointing=bool(t.gradient_checkpointing),
        # The Trainer turns checkpointing on from these; "offload" is honoured on GPUs only (run/offload.py).
        activation_checkpointing_kwargs=checkpointing_kwargs(t.gradient_checkpointing, device, announce=True),
        bf16=compute_dtype == "bfloat16",
        fp16=compute_dtype == "float16",  # GradScaler loss scaling; LoRA weights stay fp32
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps and not measuring else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps and not measuring else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=[] if measuring else trackers(recipe),  # the Trainer's integrations (run/tracking.py)
        run_name=t.run_name or output_dir.name,
        disable_tqdm=True,  # our rich display replaces tqdm
        dataset_num_proc=None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )


def eval_fields_of(module_name: str):
    """The ``eval_fields`` of the method whose module is ``module_name``: the run.json fields its entry in the
    methods table (``metrics``) records from an evaluation's metrics, e.g. the held-out reward accuracy (share of
    pairs whose chosen answer gets the higher implicit reward) and mean margin."""
    method = next(m for m in METHODS.values() if m.module == module_name)

    def eval_fields(metrics: dict) -> dict:
        return {ours: metrics[theirs] for theirs, ours in method.metrics if theirs in metrics}

    return eval_fields


def keep_lora_fp32(model) -> None:
    """TRL's trainers cast LoRA weights of a quantized model to bf16, whatever the compute dtype. Keep them fp32: fp16 loss
    scaling needs fp32 master weights, and bf16 weights drop updates below 1/256 of their size. Called before
    train() builds the optimizer, so its states are fp32-shaped too."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


class TokenCounting:
    """Counts the training tokens of each micro-batch (real ones, and real + padding: what was computed), for
    run.json and tokens/s. The preference batches hold one or more (input_ids, attention_mask) pairs under
    method-specific names (``chosen_input_ids``, ``KL_input_ids``), which the Trainer's own counter does not
    read, so the count lands in ``state.num_input_tokens_seen`` here (the config sets the Trainer's to "no")."""

    _ROW_KEYS: tuple[str, ...] = ("",)  # prefixes of the (input_ids, attention_mask) keys a step computes

    def _count_tokens(self, model, inputs) -> None:
        if not model.training:
            return
        real = total = 0
        for prefix in self._ROW_KEYS:
            ids = inputs.get(f"{prefix}input_ids")
            if ids is None:
                continue
            total += ids.numel()
            mask = inputs.get(f"{prefix}attention_mask")
            real += int(mask.sum()) if mask is not None else ids.numel()
        self.tokens_real = getattr(self, "tokens_real", 0) + real
        self.tokens_total = getattr(self, "tokens_total", 0) + total
        self.state.num_input_tokens_seen += real


def build_method_trainer(trainer_cls, model, tokenizer, args, data: MethodData, device: str, *, recipe: Recipe,
                         measuring: bool, cpu_memory: str, callbacks: list, reference=None, train_dataset=None,
                         **trainer_kwargs):
    """A method's trainer (``trainer_cls``: our subclass of TRL's), with our progress display and memory meter in
    place of TRL's printers, the eval split only when not measuring, the chunked-loss size, and fp32 LoRA weights:
    the one build every method shares. ``train_dataset``: the training rows when they are not ``data.train``'s
    (SFT's packed rows). ``reference(model)``: what the run's reference policy is, for run.json
    (``trainer.reference``); None for a method without one."""
    from transformers import PrinterCallback, ProgressCallback

    from qlora_phi3.memory.meter import PeakMemory
    from qlora_phi3.run.progress import RichProgress

    meter = PeakMemory(device, cpu_measure=cpu_memory)
    progress = RichProgress(meter)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=data.train.to_dataset() if train_dataset is None else train_dataset,
        eval_dataset=None if measuring else data.eval.to_dataset(), processing_class=tokenizer,
        callbacks=[progress, *callbacks], loss_chunk_tokens=recipe.train.loss_chunk_tokens, **trainer_kwargs)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if reference is not None:
        trainer.reference = reference(trainer.model)
    keep_lora_fp32(trainer.model)
    return trainer, progress, meter
