"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, through the Trainer's own
integrations (``TrainingArguments.report_to``), local and offline by default.

What is ours: checking before torch loads that each tracker is installed (one error naming the pip extra:
:func:`qlora_phi3.run.preflight.check_trackers`); putting their files in the run directory (TensorBoard: ``<run>/tensorboard``; MLflow:
``<run>/mlruns``; W&B: ``<run>/wandb``, offline) unless the user's environment already says where; adding
our own metrics (tokens/s, peak memory) to every logged row, so they reach each tracker beside the losses
(the step-0 eval loss arrives on its own: ``EvalAtStart`` logs it through the Trainer); and text, which the
Trainer's integrations only pass to TensorBoard, for the sample answers (:mod:`qlora_phi3.run.samples`).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from qlora_phi3.config import Recipe
from qlora_phi3.run.preflight import trackers
from qlora_phi3.ui import info

__all__ = ["TENSORBOARD_DIR", "TrackerMetrics", "attach_trackers", "log_text", "prepare_trackers"]

TENSORBOARD_DIR = "tensorboard"


def prepare_trackers(recipe: Recipe, out: Path) -> None:
    """Point the trackers at the run directory and keep them offline, where the user has not said otherwise
    (the integrations read these variables when training begins)."""
    names = trackers(recipe)
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network; `wandb sync` uploads later
        os.environ.setdefault("WANDB_DIR", str(out))
        os.environ.setdefault("WANDB_PROJECT", "qlora-phi3")
        if os.environ["WANDB_MODE"] == "offline":
            info(f"wandb: offline, in {os.environ['WANDB_DIR']}/wandb (`wandb sync` uploads it; WANDB_MODE=online "
                 "logs live)")
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "qlora-phi3")
        info(f"mlflow: tracking URI {os.environ['MLFLOW_TRACKING_URI']} (`mlflow ui --backend-store-uri ...`)")
    if "tensorboard" in names:
        info(f"tensorboard: `tensorboard --logdir {out / TENSORBOARD_DIR}`")


class TrackerMetrics(TrainerCallback):
    """Adds tokens/s and peak memory to each logged row before the trackers see it (so it runs first)."""

    def __init__(self, progress):
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update(self.progress.metrics(state))


def attach_trackers(trainer, recipe: Recipe, out: Path, progress) -> None:
    """Our part of the tracker setup on a built trainer (see the module doc)."""
    if not trackers(recipe):
        return
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
            cb.logging_dir = str(out / TENSORBOARD_DIR)  # transformers' default is output_dir/runs/<date_host>
    # First in the list: the integrations' on_log runs in list order and must see the added metrics.
    trainer.callback_handler.callbacks.insert(0, TrackerMetrics(progress))


def log_text(recipe: Recipe, out: Path, tag: str, text: str, step: int) -> None:
    """Text (markdown) to every tracker of the run, at ``step``."""
    names = trackers(recipe)
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter

        # A writer of our own: the Trainer's closes at the end of training, before the final evaluation.
        with SummaryWriter(log_dir=str(out / TENSORBOARD_DIR)) as writer:
            writer.add_text(tag, text, step)
    if "wandb" in names:
        import wandb

        if wandb.run is not None:
            wandb.run.log({tag: wandb.Html(f"<pre>{text}</pre>"), "train/global_step": step})
    if "mlflow" in names:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_text(text, f"{tag}/step_{step:06d}.md")
