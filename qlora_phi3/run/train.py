"""A training run, in three steps a reader can follow: :func:`setup` (check the inputs, load data, the 4-bit
model and LoRA, build the method's TRL trainer: ``train.method``, :mod:`qlora_phi3.run.methods`, SFT by default),
:func:`fit` (the optimizer steps) and :func:`finish` (final evaluation, adapter, run record). :func:`train` is
the three in a row.

Everything that can be wrong with the user's input is checked before the model is loaded, and the
run directory is written to only once the run really starts, so a run that fails early leaves it as
it was. ``profile`` and the benchmarks call :func:`measure`: the same setup and fit with a measuring callback,
so the memory and speed they report are those of this code path.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import TrainerCallback
from qlora_phi3.config import Recipe, dump_recipe, recipe_to_dict, with_absolute_paths
from qlora_phi3.errors import RunFailed, UserError
from qlora_phi3.files import atomic_write_json, partial_dir, publish_dir
from qlora_phi3.machine import pick_threads
from qlora_phi3.memory.oom import is_oom, oom_message
from qlora_phi3.methods import DEFAULT_METHOD, METHODS
from qlora_phi3.model.load import (Choice, ModelSource, hide_load_progress_bars, load_model, load_tokenizer,
                                   pick_attention, pick_compute_dtype, pick_device, read_model_config, resolve_model)
from qlora_phi3.model.lora import attach_lora, coverage, initial_adapter_dir, load_adapter_weights
from qlora_phi3.run.card import write_card
from qlora_phi3.run.checkpoints import last_checkpoint
from qlora_phi3.run.epochs import epoch_coverage, say_coverage
from qlora_phi3.run.guards import GracefulInterrupt, NonFiniteError, NonFiniteGuard
from qlora_phi3.run.history import KeepRecord, earlier_history
from qlora_phi3.run.measure import MeasureSteps
from qlora_phi3.run.methods import get_method
from qlora_phi3.run.methods.base import MethodData
from qlora_phi3.run.preflight import Checked, check_context, preflight
from qlora_phi3.run.record import ADAPTER_META, BASE_SHAPE_KEYS, RECIPE_FILE, RunRecord, device_info, package_versions
from qlora_phi3.run.rundir import RunDir, clear_run_dir, resume_command
from qlora_phi3.run.samples import SampleAnswers, sample_prompts
from qlora_phi3.run.schedule import LearningRateOnResume
from qlora_phi3.run.tiling import enable_tiling
from qlora_phi3.run.tracking import attach_trackers, prepare_trackers
from qlora_phi3.ranks import is_main_process, world_size as launch_world_size
from qlora_phi3.ui import console, info, warn

__all__ = ["Run", "RunInterrupted", "RunResult", "finish", "fit", "gather_state_dict", "measure", "setup", "train"]



@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path | None
    run: dict
    model: object = None  # the trained PEFT model, for callers in the same process (tests, merge checks)


class RunInterrupted(UserError):
    """Stopped on request after saving a checkpoint."""

    exit_code = 130


def _print_coverage(rows) -> None:
    from rich.table import Table

    table = Table(title="LoRA coverage", title_justify="left")
    for col in ("target", "layers adapted", "trainable params"):
        table.add_column(col, justify="right" if col != "target" else "left")
    for r in rows:
        table.add_row(r.target, f"{r.layers_adapted}/{r.layers_total}", f"{r.trainable_params:,}")
    table.add_row("[bold]total", "", f"[bold]{sum(r.trainable_params for r in rows):,}")
    console().print(table)


def _check_fsdp(recipe: Recipe, compute_dtype: str) -> None:
    """FSDP shards flat buffers of one dtype: 4-bit weights packed as uint8 beside bf16 norms cannot be sharded."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and recipe.model.quant_storage != compute_dtype:
        raise UserError(f"FSDP-QLoRA needs model.quant_storage equal to the compute dtype ({compute_dtype}), got "
                        f"{recipe.model.quant_storage!r}; set model.quant_storage={compute_dtype} "
                        "(see recipes/phi3_mini_4k_fsdp.yaml).")


def train(recipe: Recipe, resume: bool = False, force: bool = False, *, cpu_memory: str = "rss",
          checked: Checked | None = None) -> RunResult:
    """Run ``recipe`` to completion: :func:`setup`, :func:`fit`, :func:`finish` (see the module docstring); under
    torchrun/accelerate, one rank of it.

    Args:
        resume: continue the run in ``train.output_dir`` from its last complete checkpoint.
        force: delete the run in ``train.output_dir`` (once this run starts) and start over.
        cpu_memory: on a CPU, "rss" (sampled, near-free) or "tensors" (live-tensor peak, slower).
        checked: what :func:`qlora_phi3.run.preflight.preflight` found for this recipe and flags (the CLI runs it
            before torch loads); None: setup runs it.
    """
    try:
        run = setup(recipe, resume, force, cpu_memory=cpu_memory, checked=checked)
        fit(run)
        return finish(run)
    finally:
        _close_process_group()


def measure(recipe: Recipe, warmup_steps: int, measured_steps: int, *, cpu_memory: str = "tensors") -> dict:
    """The profiler's and the benchmarks' run: :func:`setup` with a measuring callback, :func:`fit`, and the
    record with the peak memory and speed of the ``measured_steps`` after ``warmup_steps`` in ``["measured"]``;
    no evaluation, checkpoints, trackers, sample answers or adapter. Returns run.json's contents."""
    try:
        run = setup(recipe, force=True, cpu_memory=cpu_memory, measurer=MeasureSteps(
            pick_device(recipe.train.device).value, warmup_steps, total_steps=warmup_steps + measured_steps))
        fit(run)
        fields = _fit_fields(run)
        fields["measured"] = run.measurer.result(run.peak)
        run.record.end("completed", wall_seconds=round(time.perf_counter() - run.t_start, 2), **fields)
        return run.record.data
    finally:
        _close_process_group()


@dataclass
class Run:
    """What :func:`setup` builds and :func:`fit` and :func:`finish` use: one run's recipe, directory, choices,
    data, trainer and record."""
    recipe: Recipe
    out: Path
    plan: RunDir
    source: ModelSource  # the recipe's model, resolved once
    model_config: object
    device: Choice
    dtype: Choice
    attn: Choice
    method: object  # the train.method plug-in (run/methods)
    tokenizer: object
    data: MethodData
    trainer: object
    progress: object
    meter: object
    record: RunRecord
    interrupt: GracefulInterrupt
    samples: SampleAnswers | None
    measurer: MeasureSteps | None
    t_start: float
    train_seconds: float = 0.0
    peak: object = None
    keeper: KeepRecord | None = None  # run.json's history and loss.png, kept current (not when measuring)


def _close_process_group() -> None:
    """Tear the process group down before exit: gloo's threads still running at interpreter shutdown
    abort the process ("terminate called without an active exception") after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _choices(recipe: Recipe) -> tuple[Choice, Choice, Choice]:
    device = pick_device(recipe.train.device)
    dtype = pick_compute_dtype(recipe.model.compute_dtype, device.value)
    attn = pick_attention(recipe.model.attn_implementation, device.value)
    return device, dtype, attn


def _cpu_threads(device: str) -> Choice | None:
    """On a CPU, torch's thread count set to the cores free to this process (machine.pick_threads)."""
    if device != "cpu":
        return None
    import torch

    n, why = pick_threads()
    torch.set_num_threads(n)
    return Choice(str(n), why)


def _check_and_choose(recipe: Recipe, source: ModelSource, checked_context: int | None):
    """What can be wrong with the recipe against the model, before anything loads; then the device, compute dtype,
    attention and CPU threads, said in one line with the reason for each."""
    model_config = read_model_config(source)
    context = getattr(model_config, "max_position_embeddings", None)
    if context != checked_context:  # the preflight checked against this number already, or could not know it
        check_context(recipe, context)
    device, dtype, attn = _choices(recipe)
    _check_fsdp(recipe, dtype.value)  # the LoRA variant, a continued adapter and the trackers: in the preflight
    threads = _cpu_threads(device.value)
    info(f"device [bold]{device.value}[/] ({device.reason}); compute dtype [bold]{dtype.value}[/] ({dtype.reason}); "
         f"attention [bold]{attn.value}[/] ({attn.reason})"
         + (f"; [bold]{threads.value}[/] threads ({threads.reason})" if threads else ""))
    if device.value == "cpu" and recipe.train.optimizer.startswith("paged_"):
        info(f"train.optimizer={recipe.train.optimizer}: bitsandbytes has no paging on CPU and runs it unpaged "
             "(same math, same checkpoints).")
    return model_config, device, dtype, attn, threads


def _claim_run_dir(plan, recipe: Recipe, force: bool) -> None:
    """Clear what an earlier run left when this one replaces it, and write the resolved recipe (rank 0 only)."""
    out = plan.path
    if plan.replace and is_main_process():
        if plan.previous or force:
            info(f"replacing the earlier run in {out}" + (f" (it ended '{plan.previous.get('status')}' with nothing "
                                                          "saved)" if not force else ""))
        clear_run_dir(out)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, out / RECIPE_FILE)


def setup(recipe: Recipe, resume: bool = False, force: bool = False, *, cpu_memory: str = "rss",
          measurer: MeasureSteps | None = None, checked: Checked | None = None) -> Run:
    """Everything before the first step: check the inputs (before any model loads), load data, the 4-bit model
    and LoRA, build the method's trainer, and claim the run directory (only now is it written to).

    ``measurer`` (the profiler's callback) makes the run a measurement: only its steps, no evaluation,
    checkpoints, trackers, sample answers or adapter. ``checked``: the preflight's findings for this recipe and
    flags (run directory, records, context), taken as they are; without them, the preflight runs here."""
    t_start = time.perf_counter()
    hide_load_progress_bars()
    measuring = measurer is not None
    if checked is None or not checked.is_for(recipe, resume, force):
        checked = preflight(recipe, resume, force, measuring=measuring)
    plan, out = checked.plan, checked.plan.path
    recipe = with_absolute_paths(plan.recipe)  # as the preflight checked it (a copy: measuring sets max_steps)
    if measuring:
        recipe.train.max_steps = measurer.total_steps
    source = resolve_model(recipe.model)  # once: every later step takes it (no second lookup or Hub probe)
    model_config, device, dtype, attn, threads = _check_and_choose(recipe, source, checked.context)
    method = get_method(recipe.train.method)
    tokenizer = load_tokenizer(source)
    data = method.load_data(recipe, tokenizer, checked.records)
    prompts = [] if measuring else sample_prompts(recipe, data.eval_records)
    fingerprint = data.train.fingerprint()
    if plan.resume_from is not None and plan.previous.get("dataset", {}).get("fingerprint") not in (None, fingerprint):
        raise UserError(f"--resume: the training data changed since {plan.resume_from.name} was written (dataset "
                        "fingerprint differs); resuming would not continue the same run. Use --force to start over.")

    # The training arguments first: building them starts the process group under a distributed launch, which
    # transformers' FSDP-aware loading checks for (it is skipped when the model loads before the group exists).
    args = method.training_arguments(recipe, out, device.value, dtype.value, measuring=measuring)
    transformers.set_seed(recipe.train.seed)
    model = _load_peft_model(recipe, source, tokenizer, device.value, dtype.value, attn.value)

    world_size = launch_world_size()
    effective_batch = recipe.train.micro_batch_size * recipe.train.grad_accum * world_size
    if world_size > 1:
        info(f"data parallel over {world_size} processes: effective batch = {recipe.train.micro_batch_size} "
             f"(micro) x {recipe.train.grad_accum} (accum) x {world_size} (processes) = {effective_batch} "
             f"{'rows' if recipe.data.packing else 'conversations'} per optimizer step")
    interrupt = GracefulInterrupt()
    guard = NonFiniteGuard(fp16=dtype.value == "float16", check_every=1 if device.value == "cpu" else
                           recipe.train.logging_steps)
    trainer, progress, meter = method.build_trainer(
        model, tokenizer, args, data, device.value, recipe=recipe, measuring=measuring, cpu_memory=cpu_memory,
        # The guard runs after every callback that may ask for a save, so no checkpoint holds a NaN.
        callbacks=[interrupt, guard, LearningRateOnResume()] + ([measurer] if measuring else []))
    if measuring:
        measurer.meter = meter
    else:
        attach_trackers(trainer, recipe, out, progress)

    _claim_run_dir(plan, recipe, force)  # the run starts: from here on the directory is this run's
    record = RunRecord(out, _run_fields(recipe, device, dtype, attn, world_size, effective_batch, data, threads))
    if getattr(trainer, "reference", None):
        record.data["reference"] = trainer.reference
    if plan.resume_from is not None:
        _carry_over(record, plan, progress)
    elif not measuring:
        trainer.add_callback(EvalAtStart(trainer, record, method))
    keeper = None if measuring else _keep_record(recipe, out, trainer, record, progress, data, world_size, t_start)
    if prompts and trainer.is_fsdp_enabled:
        # Generation on rank 0 alone would wait forever for the other ranks' shards of the weights.
        warn("train.sample_prompts: no sample answers under FSDP (generation needs every rank); merge and chat instead.")
        prompts = []
    samples = None
    if prompts:
        resumed_at = int(plan.resume_from.name.split("-")[-1]) if plan.resume_from is not None else None
        samples = SampleAnswers(trainer, prompts, recipe, out, resumed_at)
        trainer.add_callback(samples)
    if not measuring:
        prepare_trackers(recipe, out)
    record.update()
    return Run(recipe, out, plan, source, model_config, device, dtype, attn, method, tokenizer, data, trainer, progress,
               meter, record, interrupt, samples, measurer, t_start, keeper=keeper)


def _keep_record(recipe: Recipe, out: Path, trainer, record: RunRecord, progress, data: MethodData, world_size: int,
                 t_start: float) -> KeepRecord:
    """The run's plan said before it starts (run/epochs.py); run.json's history and loss.png kept current."""
    record.data["plan"] = say_coverage(recipe, epoch_coverage(recipe, len(trainer.train_dataset), world_size), data)
    keeper = KeepRecord(record, progress, t_start, f"{out.name}: {recipe.model.name_or_path}, {recipe.train.method}")
    trainer.add_callback(keeper)
    return keeper


def _load_peft_model(recipe: Recipe, source: ModelSource, tokenizer, device: str, dtype: str, attn: str):
    """The frozen 4-bit base with LoRA attached (a continued adapter loaded into it), tiled if asked."""
    model = load_model(source, device, dtype, attn)
    # Phi-3's config pads with <|endoftext|>; training pads with <unk> (never eos). Say so up front rather
    # than have the Trainer "align" it with a warning.
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = attach_lora(model, recipe.lora, source)
    if recipe.model.adapter:  # continue a trained adapter (e.g. SFT before DPO): its weights, trainable
        load_adapter_weights(model, recipe.model.adapter)
    enable_tiling(model, recipe.train.tile_tokens)  # sequence tiling of the decoder layers; 0 = off
    _print_coverage(coverage(model, recipe.lora.target_modules))
    return model


def fit(run: Run) -> None:
    """The optimizer steps (the Trainer's loop), from the run's checkpoint on resume. A NaN, an interrupt or an out
    of memory ends the record with what happened and raises one clear error; nothing half-written stays."""
    trainer, record, progress = run.trainer, run.record, run.progress
    run.meter.reset()
    t_train = time.perf_counter()
    try:
        with run.interrupt:
            trainer.train(resume_from_checkpoint=str(run.plan.resume_from) if run.plan.resume_from else None)
    except NonFiniteError as e:
        record.end("failed", failure=str(e), steps=e.step, history=progress.history,
                   wall_seconds=record.wall_seconds(run.t_start))
        raise RunFailed(_non_finite_message(e, run.recipe, run.dtype.value, run.out)) from None
    except KeyboardInterrupt:
        record.end("interrupted", steps=trainer.state.global_step, history=progress.history,
                   wall_seconds=record.wall_seconds(run.t_start))
        raise
    except Exception as e:
        if not is_oom(e):
            raise
        record.end("failed", failure="out of memory", steps=trainer.state.global_step, history=progress.history,
                   wall_seconds=record.wall_seconds(run.t_start))
        raise RunFailed(oom_message(run.recipe, run.model_config, run.device.value, trainer.state.global_step)) \
            from None
    run.train_seconds = time.perf_counter() - t_train
    run.peak = run.meter.read()
    run.meter.close()
    if run.interrupt.requested:
        checkpoint = last_checkpoint(run.out)
        fields = _fit_fields(run)
        record.end("interrupted", steps=fields["steps"], peak_memory=fields["peak_memory"],
                   history=progress.history, tokens=fields["tokens"], wall_seconds=record.wall_seconds(run.t_start))
        if run.keeper is not None:
            run.keeper.plot()
        where = f"checkpoint saved: {checkpoint}" if checkpoint else "no checkpoint could be saved"
        raise RunInterrupted(f"interrupted at step {trainer.state.global_step}; {where}. Continue with: "
                             f"{resume_command(run.out)}")


def _fit_fields(run: Run) -> dict:
    """What the steps did, for run.json: steps, losses, tokens (real and padded), speed, peak memory."""
    trainer, progress = run.trainer, run.progress
    losses = [h["loss"] for h in progress.history if "loss" in h]
    if run.record.get("train_loss_start") is None:  # kept from the interrupted run on resume
        run.record.data["train_loss_start"] = losses[0] if losses else None
    tokens = trainer.state.num_input_tokens_seen - progress.tokens_at_start
    real, total = getattr(trainer, "tokens_real", 0), getattr(trainer, "tokens_total", 0)
    return dict(steps=trainer.state.global_step, train_loss_end=losses[-1] if losses else None,
                train_seconds=round(run.train_seconds, 2), tokens={"real_tokens": real, "padded_tokens": total - real},
                tokens_per_second=round(tokens / run.train_seconds, 1) if run.train_seconds > 0 else None,
                peak_memory=run.peak.as_dict(), history=progress.history)


def finish(run: Run) -> RunResult:
    """After the last step: the final evaluation, the adapter (complete or absent), the run's card and record."""
    trainer, out = run.trainer, run.out
    fields = _fit_fields(run)
    metrics = trainer.evaluate()
    fields["eval_loss_end"] = metrics["eval_loss"]
    fields.update({f"{k}_end": v for k, v in run.method.eval_fields(metrics).items()})
    if run.samples is not None:
        fields["sample_seconds"] = round(run.samples.seconds, 2)  # all evaluations' answers, within wall_seconds
    adapter_dir = out / "adapter"
    state_dict = gather_state_dict(trainer)  # a collective under FSDP: every rank takes part
    if is_main_process():
        _save_adapter(trainer.model, run.tokenizer, run.recipe, adapter_dir, state_dict)
        write_card(out, out, run.recipe.model.name_or_path)  # also when no checkpoint wrote one (save_steps=0)
        fields["adapter_dir"] = str(adapter_dir)
    run.record.end("completed", wall_seconds=run.record.wall_seconds(run.t_start), **fields)
    plot = run.keeper.plot() if run.keeper is not None else None
    _say_done(run.record.data, run.peak, adapter_dir, run.record.path, plot)
    return RunResult(out, adapter_dir, run.record.data, trainer.model)


def _run_fields(recipe, device, dtype, attn, world_size, effective_batch, data: MethodData, threads: Choice | None) -> dict:
    return {
        "versions": package_versions(),
        "device": device_info(device.value),
        "compute_dtype": dtype.value,
        "compute_dtype_reason": dtype.reason,
        "cpu_threads": None if threads is None else {"threads": int(threads.value), "reason": threads.reason},
        "attn_implementation": attn.value,
        "world_size": world_size,
        "recipe": recipe_to_dict(recipe),
        "method": recipe.train.method,
        "dataset": {"source": recipe.data.path, "fingerprint": data.train.fingerprint(),
                    "eval_fingerprint": data.eval.fingerprint(), **data.dataset},
        "seed": recipe.train.seed,
        "effective_batch": effective_batch,
    }


def _carry_over(record: RunRecord, plan, progress) -> None:
    """What a resumed run keeps of the run it continues: its start losses, its history up to the checkpoint, its wall
    time (run/history.py) and the list of resumes."""
    prev = plan.previous
    for key in ("eval_loss_start", "train_loss_start", "eval_reward_accuracy_start", "eval_reward_margin_start",
                "eval_reward_start", "eval_reward_std_start", "eval_completion_length_start"):
        if prev.get(key) is not None:
            record.data[key] = prev[key]
    progress.history[:0] = earlier_history(plan.resume_from, prev.get("history") or [])
    record.wall_before = float(prev.get("wall_seconds") or 0.0)
    # In run.json from the first write on: a session killed before it logs a step loses nothing of the earlier ones.
    record.data.update(history=progress.history, wall_seconds=record.wall_before)
    resumes = list(prev.get("resumes", []))
    resumes.append({"from": plan.resume_from.name, "changes": {k: list(v) for k, v in plan.changes.items()},
                    "wall_seconds_before": record.wall_before})
    record.data["resumes"] = resumes
    if record.get("eval_loss_start") is not None:
        info(f"resuming from {plan.resume_from}; eval loss at step 0 (from the earlier run): "
             f"{record.get('eval_loss_start'):.4f}")
    for key, (old, new) in plan.changes.items():
        info(f"  {key}: {old} -> {new}")


def _say_done(run: dict, peak, adapter_dir: Path, run_path: Path, plot: Path | None = None) -> None:
    start, end = run.get("eval_loss_start"), run["eval_loss_end"]
    # A share of step 0 means something for a cross-entropy (chats); a preference or GRPO loss can be ~0 or negative.
    chat_loss = METHODS[run.get("method") or DEFAULT_METHOD].data == "chat"
    ratio = f" ({end / start:.1%} of step 0)" if chat_loss and start and start > 0 else ""
    info(f"[bold green]done[/] in {run['wall_seconds']:.0f}s: eval loss "
         f"{'-' if start is None else f'{start:.4f}'} -> {end:.4f}{ratio}, peak memory {peak.explained()}, "
         f"{run['tokens_per_second'] or 0:,.0f} tokens/s")
    if run.get("eval_reward_accuracy_end") is not None:
        start_acc, start_margin = run.get("eval_reward_accuracy_start"), run.get("eval_reward_margin_start")
        info(f"held-out reward accuracy {'-' if start_acc is None else f'{start_acc:.1%}'} -> "
             f"{run['eval_reward_accuracy_end']:.1%}, margin {'-' if start_margin is None else f'{start_margin:+.3f}'} "
             f"-> {run.get('eval_reward_margin_end', 0):+.3f}")
    if run.get("eval_reward_end") is not None:  # grpo: mean reward of completions sampled for the held-out prompts
        start = run.get("eval_reward_start")
        info(f"held-out mean reward (sampled) {'-' if start is None else f'{start:.3f}'} -> {run['eval_reward_end']:.3f}")
    info(f"adapter: [bold]{adapter_dir}[/]   run record: {run_path}" + (f"   loss curve: {plot}" if plot else ""))
    run_dir = adapter_dir.parent
    info(f"next: `qlora-phi3 chat {run_dir}` to try it, `qlora-phi3 merge {run_dir} --out {run_dir}-merged` for one "
         f"fp16 model, `qlora-phi3 export {run_dir} --out {run_dir}-gguf` for llama.cpp / Ollama")


class EvalAtStart(TrainerCallback):
    """The step-0 eval loss, taken once training has begun.

    Not with ``trainer.evaluate()`` before ``trainer.train()``: under DDP that prepares the model for
    evaluation first, after which accelerate skips the DDP wrap for training and every rank silently
    trains on its own gradients (checked: ranks diverge at step 1 with transformers 5.24 / accelerate 1.15).
    """

    def __init__(self, trainer, record: RunRecord, method):
        self.trainer, self.record, self.method = trainer, record, method

    def on_train_begin(self, args, state, control, **kwargs):
        info("evaluating the untrained adapter (step 0)...")
        metrics = self.trainer.evaluate()  # the progress display prints it ("step 0  eval loss ...")
        extra = {f"{k}_start": v for k, v in self.method.eval_fields(metrics).items()}
        self.record.update(eval_loss_start=metrics["eval_loss"], **extra)


def _non_finite_message(e: NonFiniteError, recipe: Recipe, compute_dtype: str, out: Path) -> str:
    checkpoint = last_checkpoint(out)
    keep = (f"The last good checkpoint is {checkpoint} (checked before it was written; resume with "
            f"`{resume_command(out)}` once fixed)." if checkpoint else "No checkpoint was written before it; "
            "nothing to resume.")
    causes = [f"learning rate too high (train.lr={recipe.train.lr:g}; try a third of it, or more warmup: "
              f"train.warmup_ratio={max(recipe.train.warmup_ratio, 0.1):g})"]
    if compute_dtype == "float16":
        causes.insert(0, "fp16 overflow: activations exceeded 65504 (use a bf16 GPU, or lower train.lr)")
    causes.append(f"gradient spikes (train.max_grad_norm={recipe.train.max_grad_norm:g}; try 0.3)")
    return f"training stopped: {e}. No NaN reached a saved checkpoint. {keep} Likely causes: {'; '.join(causes)}."


def gather_state_dict(trainer) -> dict | None:
    """The full model state dict under FSDP, where each rank holds only a shard of the LoRA weights (saving
    rank 0's shard would write a partial adapter); None otherwise (PEFT reads the weights itself)."""
    if not trainer.is_fsdp_enabled:
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def _save_adapter(peft_model, tokenizer, recipe: Recipe, adapter_dir: Path, state_dict: dict | None = None) -> None:
    """Adapter (safetensors), tokenizer and chat template, and the base model's identity, written to a
    partial directory and renamed, so ``adapter/`` is either complete or absent."""
    tmp = partial_dir(adapter_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    # OLoRA / LoftQ: saved as a plain LoRA against the original base (model/lora.py), which merge and chat expect.
    # Only the trained adapter: a preference run also holds TRL's frozen "ref" copy (run/methods/preference.py).
    peft_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, selected_adapters=["default"],
                               path_initial_model_for_weight_conversion=initial_adapter_dir(peft_model))
    tokenizer.save_pretrained(tmp)
    write_card(tmp, adapter_dir.parent, recipe.model.name_or_path, kind="adapter")  # not PEFT's empty template
    base = peft_model.get_base_model().config
    atomic_write_json(tmp / ADAPTER_META, {
        "base_model": recipe.model.name_or_path,
        "revision": recipe.model.revision,
        "base_config": {k: getattr(base, k, None) for k in BASE_SHAPE_KEYS},
        "lora": recipe_to_dict(recipe)["lora"],
        "max_seq_len": recipe.data.max_seq_len,
        "method": recipe.train.method,
    })
    publish_dir(tmp, adapter_dir)

