"""Base versus fine-tune, end to end: check every input (target, tasks, data) before a model loads, evaluate each
model with the same settings (lm-eval tasks and/or greedy answers on held-out chats), and write the outputs, each
complete or absent: lm-eval's results JSON per model, ``answers.jsonl``, ``eval_summary.json``, and for a run the
summary in its ``run.json`` too.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qlora_phi3.errors import UserError
from qlora_phi3.evaluate.target import Evaluated, Target

__all__ = ["EvalPlan", "SUMMARY_FILE", "compare_models", "evaluate_after_training", "evaluate_target", "plan_batch"]

SUMMARY_FILE = "eval_summary.json"
ANSWERS_FILE = "answers.jsonl"
CPU_BATCH = 8  # on a CPU memory is rarely the limit, and bigger batches of padded rows only cost time


@dataclass
class EvalPlan:
    """One comparison's settings; see ``qlora-phi3 eval --help`` for each."""
    tasks: list[str] = field(default_factory=list)
    include_paths: list[Path] = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int | None = None  # None: chosen for the budget (plan_batch)
    max_length: int | None = None
    budget_bytes: int | None = None
    chat_template: bool = True
    data: str | None = None  # a file, HELD_OUT for the run's own held-out split, or None
    max_new_tokens: int = 256
    device: str = "auto"


HELD_OUT = "held-out"


def plan_batch(plan: EvalPlan, target: Target, model_config, device: str, generates: bool) -> tuple[int, str]:
    """The lm-eval batch size and why: the user's, or on a GPU the largest the estimate fits in the budget (default
    the card's memory) at --max-length tokens (default the model's context); on a CPU, 8."""
    if plan.batch_size is not None:
        return plan.batch_size, "--batch-size"
    if not device.startswith("cuda"):
        return CPU_BATCH, "CPU default (--batch-size to change)"
    import torch

    from qlora_phi3.config import Recipe
    from qlora_phi3.memory.eval_memory import pick_eval_batch

    budget = plan.budget_bytes or torch.cuda.get_device_properties(device).total_memory
    seq = plan.max_length or getattr(model_config, "max_position_embeddings", 4096)
    recipe = target.recipe if target.kind == "run" and target.recipe is not None else Recipe()
    rows, est = pick_eval_batch(recipe, model_config, device, seq, budget,
                                merged=target.merged or target.kind == "model", generates=generates)
    return rows, (f"the largest batch whose estimated peak ({est.total_gib:.2f} GiB, rows of {seq:,} tokens) fits "
                  f"{budget / 1024**3:.2f} GiB")


def _prompts(plan: EvalPlan, target: Target, tokenizer_loader) -> tuple[list, str]:
    from qlora_phi3.evaluate.answers import held_out_prompts, prompts_from_file

    limit = int(plan.limit) if plan.limit and plan.limit >= 1 else None
    if plan.data is None:
        return [], ""
    if plan.data == HELD_OUT:
        source = target.source
        return held_out_prompts(target.recipe, source.run if source else None, tokenizer_loader(), limit)
    prompts = prompts_from_file(plan.data, limit)
    return prompts, plan.data


class _PeakMemory:
    """On a GPU, the allocator's peak while one model is evaluated (beside the estimate the batch was chosen by)."""

    def __init__(self, model):
        import torch

        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict:
        if self.device.type != "cuda":
            return {}
        import torch

        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / 1024**3, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / 1024**3, 3)}


def compare_models(models: Iterator[Evaluated], plan: EvalPlan, tasks, prompts: list, batch_size: int,
                   staging: Path) -> dict:
    """Evaluate each model of ``models`` in turn with the same settings; the summary (without file paths)."""
    from qlora_phi3.evaluate.answers import generate_answers
    from qlora_phi3.evaluate.harness import HarnessSettings, compare_rows, run_harness
    from qlora_phi3.ui import info

    settings = HarnessSettings(plan.tasks, batch_size, plan.chat_template, plan.num_fewshot, plan.limit,
                               plan.max_length)
    results, answers, described = {}, {}, {}
    for m in models:
        info(f"evaluating [bold]{m.label}[/]: {m.description}")
        t0 = time.perf_counter()
        peak = _PeakMemory(m.model)
        if plan.tasks:
            results[m.label], _ = run_harness(m.model, m.tokenizer, settings, tasks.manager, staging / m.label)
        if prompts:
            answers[m.label] = generate_answers(m.model, m.tokenizer, prompts, plan.max_new_tokens)
        described[m.label] = {"description": m.description, "seconds": round(time.perf_counter() - t0, 1),
                              **peak.read()}
    labels = list(described)
    summary = {"models": described, "settings": settings.as_dict(), "tasks": plan.tasks, "rows": []}
    if results:
        after = results[labels[-1]]
        summary["rows"] = compare_rows(results.get("base") if len(labels) > 1 else None, after)
        summary["lm_eval_version"] = after.get("lm_eval_version")
    if answers:
        from qlora_phi3.evaluate.answers import score_answers

        summary["answer_rows"], summary["answers"] = score_answers(prompts, answers)
    return summary


def _write_outputs(summary: dict, staging: Path, out_dir: Path, run_dir: Path | None) -> dict:
    """Move lm-eval's files into place and write answers.jsonl and the summary (and run.json's copy), atomically."""
    from qlora_phi3.evaluate.answers import answers_jsonl
    from qlora_phi3.evaluate.harness import save_results
    from qlora_phi3.files import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for label in summary["models"]:
        moved = save_results(staging / label, out_dir / label) if (staging / label).is_dir() else []
        if moved:
            summary["models"][label]["results_file"] = str(moved[0])
    rows = summary.pop("answer_rows", None)
    if rows is not None:
        atomic_write_text(out_dir / ANSWERS_FILE, answers_jsonl(rows))
        files["answers"] = str(out_dir / ANSWERS_FILE)
    summary["files"] = {**files, "summary": str(out_dir / SUMMARY_FILE)}
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    if run_dir is not None:
        from qlora_phi3.run.record import RUN_FILE, read_run

        run = read_run(run_dir)
        if run:
            run["eval"] = summary
            atomic_write_json(run_dir / RUN_FILE, run)
    summary["answer_rows"] = rows or []
    shutil.rmtree(staging, ignore_errors=True)
    return summary


def _default_out(target: Target) -> Path:
    if target.run_dir is not None:
        return target.run_dir / "eval"
    return Path("eval") / Path(target.text.rstrip("/")).name.replace(":", "-")


def evaluate_target(target_text: str, plan: EvalPlan, out: str | None = None, merged: bool = False,
                    base: str | None = None) -> dict:
    """``qlora-phi3 eval``: every check first (target, data file, tasks), then the models, then the files."""
    from qlora_phi3.evaluate.target import run_tokenizer, each_model, resolve_target
    from qlora_phi3.evaluate.tasks import prepare_tasks
    from qlora_phi3.files import partial_dir
    from qlora_phi3.model.load import pick_compute_dtype, pick_device, read_model_config

    if not plan.tasks and plan.data is None:
        raise UserError("nothing to evaluate: give --tasks (lm-eval tasks, e.g. --tasks tiny_chat_facts) and/or "
                        "--data (greedy answers on held-out conversations).")
    target = resolve_target(target_text, merged, base)
    if plan.data == HELD_OUT and target.kind != "run":
        raise UserError("--data without a file uses a run's held-out split; TARGET is not a run. Give --data FILE.")
    prompts, prompts_from = _prompts(plan, target, lambda: run_tokenizer(target.source))
    tasks = prepare_tasks(plan.tasks, plan.include_paths) if plan.tasks else None
    device = pick_device(plan.device).value
    model_cfg = target.source.model_cfg if target.kind == "run" else target.model_cfg
    compute = pick_compute_dtype(model_cfg.compute_dtype, device).value
    batch, why = plan_batch(plan, target, read_model_config(model_cfg), device, tasks.generates) if tasks else (0, "")
    out_dir = Path(out).expanduser() if out else _default_out(target)
    staging = partial_dir(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    summary = compare_models(each_model(target, device, compute), plan, tasks, prompts, batch, staging)
    summary.update(target=target_text, kind=target.kind, merged=target.merged, device=device,
                   batch_size_reason=why, data=prompts_from or None)
    return _write_outputs(summary, staging, out_dir, target.run_dir)


def evaluate_after_training(result, recipe, plan: EvalPlan, tasks) -> dict:
    """The end-of-train comparison (``train.eval_tasks``): the trained model still in memory, its adapter off for
    the base, with the tasks checked before training began (``prepare_tasks``)."""
    from qlora_phi3.evaluate.target import each_adapter_state
    from qlora_phi3.files import partial_dir
    from qlora_phi3.model.load import load_tokenizer

    tokenizer = load_tokenizer(recipe.model, str(result.adapter_dir))
    device = str(next(result.model.parameters()).device)
    batch = plan.batch_size or CPU_BATCH
    if device.startswith("cuda") and plan.batch_size is None:
        from qlora_phi3.memory.eval_memory import pick_eval_batch
        from qlora_phi3.model.load import read_model_config

        import torch

        # What is free now plus the weights the estimate counts; training's leftovers stay where they are.
        budget = torch.cuda.mem_get_info(device)[0] + result.model.get_memory_footprint()
        seq = plan.max_length or recipe.data.max_seq_len
        batch, _ = pick_eval_batch(recipe, read_model_config(recipe.model), device, seq, budget,
                                   generates=tasks.generates)
    out_dir = result.output_dir / "eval"
    staging = partial_dir(out_dir)
    models = each_adapter_state(result.model, tokenizer, f"4-bit {recipe.model.name_or_path}", str(result.adapter_dir))
    summary = compare_models(models, plan, tasks, [], batch, staging)
    summary.update(target=str(result.output_dir), kind="run", merged=False, device=device,
                   batch_size_reason="end of training", data=None)
    return _write_outputs(summary, staging, out_dir, result.output_dir)
