"""A training run, top to bottom: check inputs, load data and the 4-bit model, attach LoRA, train with
TRL's SFTTrainer, save the adapter and ``run.json``.

Everything that can be wrong with the user's input is checked before the model is loaded.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_phi3.config import Recipe, dump_recipe, recipe_to_dict
from qlora_phi3.errors import RunFailed, UserError
from qlora_phi3.ui import info, is_main_process, warn

__all__ = ["RunResult", "prepare_output_dir", "train"]

RUN_MARKERS = ("run.json", "recipe.yaml", "adapter")


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path
    run: dict
    model: object = None  # the trained PEFT model, for callers in the same process (tests, merge checks)


def _is_run_dir(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS) or any(path.glob("checkpoint-*"))


def prepare_output_dir(path: Path, resume: bool, force: bool) -> None:
    """Refuse to mix two runs in one directory unless told to resume or overwrite; check it is writable.

    Only rank 0 decides under a distributed launch: the others would see rank 0's first files and refuse."""
    if not is_main_process():
        return
    if resume and force:
        raise UserError("--resume and --force contradict each other: resume continues the run in "
                        f"{path}, force deletes it.")
    if path.exists() and not path.is_dir():
        raise UserError(f"train.output_dir={str(path)!r} is a file, not a directory.")
    if path.is_dir() and any(path.iterdir()):
        if not _is_run_dir(path):
            raise UserError(f"train.output_dir={str(path)!r} holds files that are not a qlora-phi3 run; "
                            "choose an empty or new directory.")
        if force and is_main_process():
            shutil.rmtree(path)
        elif not resume and not force:
            raise UserError(f"train.output_dir={str(path)!r} already holds a run. Add --resume to continue it "
                            "from its last checkpoint, --force to delete it and start over, or set "
                            "train.output_dir=NEW_DIR.")
    elif resume:
        raise UserError(f"--resume: nothing to resume in {path} (no run there yet); drop --resume.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"train.output_dir={str(path)!r} is not writable ({e.strerror}); "
                        "choose a directory you can write to.") from None


def _sft_config(recipe: Recipe, device: str, compute_dtype: str):
    from trl import SFTConfig

    from qlora_phi3.run.offload import checkpointing_kwargs

    t = recipe.train
    return SFTConfig(
        output_dir=t.output_dir,
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
        # transformers re-applies these at Trainer init; "offload" is honoured on GPUs only (qlora_phi3/offload.py).
        activation_checkpointing_kwargs=checkpointing_kwargs(t.gradient_checkpointing, device),
        bf16=compute_dtype == "bfloat16",
        fp16=compute_dtype == "float16",  # GradScaler loss scaling; LoRA weights stay fp32
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=[],
        disable_tqdm=True,  # our rich display replaces tqdm
        include_num_input_tokens_seen="non_padding",
        max_length=None,  # already truncated (and counted) in formatting.encode_records
        packing=False,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )


def _print_coverage(rows) -> None:
    from rich.table import Table

    from qlora_phi3.ui import console

    table = Table(title="LoRA coverage", title_justify="left")
    for col in ("target", "layers adapted", "trainable params"):
        table.add_column(col, justify="right" if col != "target" else "left")
    for r in rows:
        table.add_row(r.target, f"{r.layers_adapted}/{r.layers_total}", f"{r.trainable_params:,}")
    table.add_row("[bold]total", "", f"[bold]{sum(r.trainable_params for r in rows):,}")
    console().print(table)


def _load_splits(recipe: Recipe, tokenizer):
    from qlora_phi3.data.read import load_records
    from qlora_phi3.data.encode import encode_records, split_records

    records, report = load_records(recipe.data)
    if recipe.data.max_samples:
        records = records[: recipe.data.max_samples]
    if recipe.data.eval_split:
        train_recs = records
        eval_recs, eval_report = load_records(recipe.data, split=recipe.data.eval_split)
        eval_recs = eval_recs[: recipe.data.max_eval_samples]
    else:
        train_recs, eval_recs = split_records(records, recipe.data.eval_fraction, recipe.data.max_eval_samples,
                                              recipe.train.seed)
    if report.n_skipped:
        warn(f"skipped {report.n_skipped} of {report.total} records in {report.source}:")
        for line in report.summary_lines():
            info(f"  {line}")
    for note in report.notes:
        info(f"data: {note}")
    train_enc = encode_records(train_recs, tokenizer, recipe.data.max_seq_len)
    eval_enc = encode_records(eval_recs, tokenizer, recipe.data.max_seq_len)
    if not train_enc.input_ids:
        raise UserError(f"no training sample keeps an assistant token within data.max_seq_len="
                        f"{recipe.data.max_seq_len}; raise data.max_seq_len.")
    if not eval_enc.input_ids:
        raise UserError("no eval sample keeps an assistant token within data.max_seq_len; raise data.max_seq_len.")
    info(f"data: {len(train_enc.input_ids)} train / {len(eval_enc.input_ids)} eval conversations, "
         f"{train_enc.n_tokens:,} train tokens ({train_enc.n_label_tokens:,} with loss)")
    for name, enc in (("train", train_enc), ("eval", eval_enc)):
        if enc.truncated:
            warn(f"{enc.truncated} {name} samples longer than data.max_seq_len={recipe.data.max_seq_len} were "
                 f"truncated ({enc.dropped} dropped: no assistant token left; "
                 f"{enc.assistant_tokens_lost:,} assistant tokens lost).")
    return train_enc, eval_enc, report


def _check_fsdp(recipe: Recipe, compute_dtype: str) -> None:
    """FSDP shards flat buffers of one dtype: 4-bit weights packed as uint8 beside bf16 norms cannot be sharded."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and recipe.model.quant_storage != compute_dtype:
        raise UserError(f"FSDP-QLoRA needs model.quant_storage equal to the compute dtype ({compute_dtype}), got "
                        f"{recipe.model.quant_storage!r}; set model.quant_storage={compute_dtype} "
                        "(see recipes/phi3_mini_4k_fsdp.yaml).")


def _check_against_model(recipe: Recipe, model_config) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and recipe.data.max_seq_len > limit:
        raise UserError(f"data.max_seq_len={recipe.data.max_seq_len} exceeds the model's context of {limit} "
                        f"tokens ({recipe.model.name_or_path}); lower it or use a long-context model "
                        "(microsoft/Phi-3-mini-128k-instruct).")


def train(recipe: Recipe, resume: bool = False, force: bool = False, *, cpu_memory: str = "rss") -> RunResult:
    """Run ``recipe`` to completion (see the module docstring); under torchrun/accelerate, one rank of it.

    ``cpu_memory``: on a CPU, "rss" (sampled, near-free) or "tensors" (the profiler's live-tensor peak,
    slower); benchmarks that compare with a tensor-measured run pass "tensors"."""
    try:
        return _train(recipe, resume, force, cpu_memory)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before exit: gloo's threads still running at interpreter shutdown
    abort the process ("terminate called without an active exception") after a successful run."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(recipe: Recipe, resume: bool, force: bool, cpu_memory: str) -> RunResult:
    from qlora_phi3.model.load import (load_model, load_tokenizer, pick_attention, pick_compute_dtype, pick_device,
                        read_model_config)

    t_start = time.perf_counter()
    out = Path(recipe.train.output_dir).expanduser()
    prepare_output_dir(out, resume, force)
    model_config = read_model_config(recipe.model)
    _check_against_model(recipe, model_config)
    device = pick_device(recipe.train.device)
    dtype = pick_compute_dtype(recipe.model.compute_dtype, device.value)
    attn = pick_attention(recipe.model.attn_implementation, device.value)
    _check_fsdp(recipe, dtype.value)
    info(f"device [bold]{device.value}[/] ({device.reason}); compute dtype [bold]{dtype.value}[/] ({dtype.reason}); "
         f"attention [bold]{attn.value}[/] ({attn.reason})")

    if device.value == "cpu" and recipe.train.optimizer.startswith("paged_"):
        info(f"train.optimizer={recipe.train.optimizer}: bitsandbytes has no paging on CPU and runs it unpaged "
             "(same math, same checkpoints).")
    tokenizer = load_tokenizer(recipe.model)
    train_enc, eval_enc, _ = _load_splits(recipe, tokenizer)
    if is_main_process():
        dump_recipe(recipe, out / "recipe.yaml")

    from qlora_phi3.run.trainer import build_trainer

    import transformers

    transformers.set_seed(recipe.train.seed)
    model = load_model(recipe.model, device.value, dtype.value, attn.value)
    # Phi-3's config pads with <|endoftext|>; training pads with <unk> (never eos). Say so up front rather
    # than have the Trainer "align" it with a warning.
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    from qlora_phi3.model.lora import attach_lora, coverage

    model = attach_lora(model, recipe.lora, recipe.train.gradient_checkpointing)
    from qlora_phi3.run.tiling import enable_tiling

    enable_tiling(model, recipe.train.tile_tokens)  # sequence tiling of the decoder layers; 0 = off
    _print_coverage(coverage(model, recipe.lora.target_modules))

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    effective_batch = recipe.train.micro_batch_size * recipe.train.grad_accum * world_size
    if world_size > 1:
        info(f"data parallel over {world_size} processes: effective batch = {recipe.train.micro_batch_size} "
             f"(micro) x {recipe.train.grad_accum} (accum) x {world_size} (processes) = {effective_batch} "
             "conversations per optimizer step")
    args = _sft_config(recipe, device.value, dtype.value)
    trainer, progress, meter = build_trainer(
        model, tokenizer, args, train_enc, eval_enc, device.value,
        packing_max_seq_len=recipe.data.max_seq_len if recipe.data.packing else None,
        loss_chunk_tokens=recipe.train.loss_chunk_tokens, cpu_memory=cpu_memory)
    from qlora_phi3.run.checkpoints import last_checkpoint
    from qlora_phi3.run.record import device_info, package_versions

    run_path = out / "run.json"
    previous = _read_json(run_path) if resume else {}
    run = {
        "status": "running",
        "versions": package_versions(),
        "device": device_info(device.value),
        "compute_dtype": dtype.value,
        "attn_implementation": attn.value,
        "world_size": world_size,
        "recipe": recipe_to_dict(recipe),
        "dataset": {"source": recipe.data.path, "fingerprint": train_enc.fingerprint(),
                    "eval_fingerprint": eval_enc.fingerprint(), "train_samples": len(train_enc.input_ids),
                    "eval_samples": len(eval_enc.input_ids), "train_tokens": train_enc.n_tokens,
                    "truncated": train_enc.truncated + eval_enc.truncated},
        "seed": recipe.train.seed,
        "effective_batch": effective_batch,
    }
    resume_from = None
    if resume:
        resume_from = last_checkpoint(out)
        if resume_from is None:
            warn(f"--resume: no complete checkpoint in {out}; starting from step 0.")
        elif previous.get("dataset", {}).get("fingerprint") not in (None, run["dataset"]["fingerprint"]):
            raise UserError(f"--resume: the training data changed since {resume_from.name} was written "
                            "(dataset fingerprint differs); resuming would not continue the same run. "
                            "Use --force to start over.")
    from qlora_phi3.run.guards import GracefulInterrupt, NonFiniteError, NonFiniteGuard

    interrupt = GracefulInterrupt()
    trainer.add_callback(NonFiniteGuard(fp16=dtype.value == "float16"))
    trainer.add_callback(interrupt)
    t_train = time.perf_counter()
    try:
        with interrupt:
            if previous.get("eval_loss_start") is not None and resume_from is not None:
                run["eval_loss_start"] = previous["eval_loss_start"]
                run["train_loss_start"] = previous.get("train_loss_start")
                info(f"eval loss at step 0 (from the interrupted run): {run['eval_loss_start']:.4f}")
            else:
                trainer.add_callback(_eval_at_start(trainer, run, run_path))
            _write_run(run_path, run)
            meter.reset()
            t_train = time.perf_counter()
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except NonFiniteError as e:
        _write_run(run_path, {**run, "status": "failed", "failure": str(e), "history": progress.history})
        raise RunFailed(_non_finite_message(e, recipe, dtype.value, out)) from None
    except KeyboardInterrupt:
        _write_run(run_path, {**run, "status": "interrupted", "steps": trainer.state.global_step,
                              "history": progress.history})
        raise
    except Exception as e:
        if not _is_oom(e):
            raise
        _write_run(run_path, {**run, "status": "failed", "failure": "out of memory", "history": progress.history})
        from qlora_phi3.memory.oom import oom_message

        raise RunFailed(oom_message(recipe, model_config, device.value, trainer.state.global_step)) from None
    train_seconds = time.perf_counter() - t_train
    peak = meter.read()
    losses = [h["loss"] for h in progress.history if "loss" in h]
    if run.get("train_loss_start") is None:  # kept from the interrupted run on resume
        run["train_loss_start"] = losses[0] if losses else None
    if interrupt.requested:
        checkpoint = last_checkpoint(out)
        _write_run(run_path, {**run, "status": "interrupted", "steps": trainer.state.global_step,
                              "peak_memory": peak.as_dict(), "history": progress.history})
        where = f"checkpoint saved: {checkpoint}" if checkpoint else "no checkpoint could be saved"
        raise RunInterrupted(f"interrupted at step {trainer.state.global_step}; {where}. Continue with: "
                             f"qlora-phi3 train {recipe.source if recipe.source != '<defaults>' else ''} "
                             f"train.output_dir={out} --resume (same recipe and overrides).")
    run["eval_loss_end"] = trainer.evaluate()["eval_loss"]
    tokens = trainer.state.num_input_tokens_seen - progress._tokens0
    run.update(
        status="completed",
        steps=trainer.state.global_step,
        train_loss_end=losses[-1] if losses else None,
        train_seconds=round(train_seconds, 2),
        wall_seconds=round(time.perf_counter() - t_start, 2),
        tokens_per_second=round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        peak_memory=peak.as_dict(),
        history=progress.history,
    )
    adapter_dir = out / "adapter"
    if is_main_process():
        _save_adapter(trainer.model, tokenizer, recipe, adapter_dir)
        run["adapter_dir"] = str(adapter_dir)
    _write_run(run_path, run)
    meter.close()
    ratio = run["eval_loss_end"] / run["eval_loss_start"] if run["eval_loss_start"] else float("nan")
    info(f"[bold green]done[/] in {run['wall_seconds']:.0f}s: eval loss {run['eval_loss_start']:.4f} -> "
         f"{run['eval_loss_end']:.4f} ({ratio:.1%} of step 0), peak memory {peak.short()}, "
         f"{run['tokens_per_second'] or 0:,.0f} tokens/s")
    info(f"adapter: [bold]{adapter_dir}[/]   run record: {run_path}")
    return RunResult(out, adapter_dir, run, trainer.model)


def _eval_at_start_class():
    from transformers import TrainerCallback

    class EvalAtStart(TrainerCallback):
        """The step-0 eval loss, taken once training has begun.

        Not with ``trainer.evaluate()`` before ``trainer.train()``: under DDP that prepares the model for
        evaluation first, after which accelerate skips the DDP wrap for training and every rank silently
        trains on its own gradients (checked: ranks diverge at step 1 with transformers 5.24 / accelerate 1.15).
        """

        def __init__(self, trainer, run: dict, run_path: Path):
            self.trainer, self.run, self.run_path = trainer, run, run_path

        def on_train_begin(self, args, state, control, **kwargs):
            info("evaluating the untrained adapter (step 0)...")
            self.run["eval_loss_start"] = self.trainer.evaluate()["eval_loss"]
            info(f"eval loss at step 0: {self.run['eval_loss_start']:.4f}")
            _write_run(self.run_path, self.run)

    return EvalAtStart


def _eval_at_start(trainer, run: dict, run_path: Path):
    return _eval_at_start_class()(trainer, run, run_path)


class RunInterrupted(UserError):
    """Stopped on request after saving a checkpoint."""

    exit_code = 130


def _write_run(path: Path, run: dict) -> None:
    from qlora_phi3.run.record import atomic_write_json

    if is_main_process():
        atomic_write_json(path, run)


def _is_oom(e: Exception) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _non_finite_message(e, recipe: Recipe, compute_dtype: str, out: Path) -> str:
    from qlora_phi3.run.checkpoints import last_checkpoint

    checkpoint = last_checkpoint(out)
    keep = (f"The last good checkpoint is {checkpoint} (resume with --resume once fixed)."
            if checkpoint else "No checkpoint was written before it; nothing to resume.")
    causes = [f"learning rate too high (train.lr={recipe.train.lr:g}; try a third of it, or more warmup: "
              f"train.warmup_ratio={max(recipe.train.warmup_ratio, 0.1):g})"]
    if compute_dtype == "float16":
        causes.insert(0, "fp16 overflow: activations exceeded 65504 (use a bf16 GPU, or lower train.lr)")
    causes.append(f"gradient spikes (train.max_grad_norm={recipe.train.max_grad_norm:g}; try 0.3)")
    return (f"training stopped: {e}. The update was not applied, so no NaN reached the saved weights. {keep} "
            f"Likely causes: {'; '.join(causes)}.")


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_adapter(peft_model, tokenizer, recipe: Recipe, adapter_dir: Path) -> None:
    """Adapter (safetensors), tokenizer and chat template, and the base model's identity, written to a
    temporary directory and renamed, so ``adapter/`` is either complete or absent."""
    from qlora_phi3.run.record import atomic_write_json

    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    base = peft_model.get_base_model().config
    atomic_write_json(tmp / "qlora_phi3.json", {
        "base_model": recipe.model.name_or_path,
        "revision": recipe.model.revision,
        "base_config": {k: getattr(base, k, None) for k in (
            "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings")},
        "lora": recipe_to_dict(recipe)["lora"],
        "max_seq_len": recipe.data.max_seq_len,
    })
    old = adapter_dir.with_name(adapter_dir.name + ".old")
    if adapter_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        adapter_dir.rename(old)
    tmp.rename(adapter_dir)
    shutil.rmtree(old, ignore_errors=True)
