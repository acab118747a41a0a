"""lm-evaluation-harness on a model that is already loaded: ``lm_eval.simple_evaluate`` with an ``HFLM`` built
from the model and its tokenizer, so the base (the adapter switched off) and the fine-tune are the same weights in
memory, scored by lm-eval's own tasks and metrics with the same settings. Nothing of lm-eval is re-implemented:
its results dictionary is saved as its CLI saves it (``EvaluationTracker``), and only read here for the table.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["HarnessSettings", "compare_rows", "run_harness", "save_results"]


@dataclass
class HarnessSettings:
    """What lm-eval is asked, the same for every model of one comparison.

    chat_template: render each request with the tokenizer's chat template (lm-eval's ``apply_chat_template``, with
        few-shot examples as earlier turns, ``fewshot_as_multiturn``); False: lm-eval's plain text prompts.
    """
    tasks: list[str]
    batch_size: int
    chat_template: bool = True
    num_fewshot: int | None = None
    limit: float | None = None
    max_length: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def run_harness(model, tokenizer, settings: HarnessSettings, task_manager, staging: Path) -> tuple[dict, float]:
    """lm-eval's results for ``model`` (in the state the caller put it in: adapter on or off), saved by lm-eval's
    own tracker under ``staging``; returns the results and the seconds they took."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=settings.max_length)
    tracker = EvaluationTracker(output_path=str(staging))
    with torch.no_grad():
        results = simple_evaluate(model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
                                  batch_size=settings.batch_size, limit=settings.limit, task_manager=task_manager,
                                  apply_chat_template=settings.chat_template,
                                  fewshot_as_multiturn=settings.chat_template, log_samples=False,
                                  evaluation_tracker=tracker)
    tracker.save_results_aggregated(results=results, samples=None)
    return results, time.perf_counter() - t0


def save_results(staging: Path, out_dir: Path) -> list[Path]:
    """Move lm-eval's results files (``<model>/results_<date>.json``, as its CLI names them) from ``staging`` into
    ``out_dir``, each by one rename: complete or absent."""
    moved = []
    for src in sorted(staging.rglob("results_*.json")):
        dest = out_dir / src.name
        out_dir.mkdir(parents=True, exist_ok=True)
        src.replace(dest)
        moved.append(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return moved


def _metrics(results: dict) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(task, metric) -> (value, stderr) of every number in lm-eval's results, groups included, in its order.
    lm-eval keys them 'acc,none' (metric, filter) beside 'acc_stderr,none'."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            out[(task, name)] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def compare_rows(base: dict | None, finetune: dict) -> list[dict]:
    """The before/after rows: task, metric, base, fine-tune, delta and both stderrs (lm-eval's), in lm-eval's order;
    ``higher_is_better`` from lm-eval's own results, for the colour of the delta."""
    after = _metrics(finetune)
    before = _metrics(base) if base is not None else {}
    better = finetune.get("higher_is_better", {})
    rows = []
    for (task, metric), (value, stderr) in after.items():
        b = before.get((task, metric))
        rows.append({"task": task, "metric": metric, "base": b[0] if b else None, "finetune": value,
                     "delta": value - b[0] if b else None, "base_stderr": b[1] if b else None,
                     "finetune_stderr": stderr,
                     "higher_is_better": better.get(task, {}).get(metric.split(" ")[0])})
    return rows
