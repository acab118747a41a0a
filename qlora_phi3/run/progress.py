"""The live training display: a rich progress bar plus one log line per ``train.logging_steps``.

A ``TrainerCallback`` because TRL/transformers own the loop; we only render what they report. When the output is
not a terminal (a pipe, a log file, CI) there is no bar, which would only be drawn once, cut to the console's width:
the log lines alone, each whole.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from qlora_phi3.memory.meter import PeakMemory
from qlora_phi3.ui import console

__all__ = ["RichProgress"]


def _rewards(logs: dict, prefix: str = "") -> str:
    """The preference methods' reward accuracy and margin (TRL's ``rewards/accuracies``, ``rewards/margins``), when
    the trainer logs them: the share of pairs whose chosen answer out-scores the rejected one, and by how much."""
    acc, margin = logs.get(f"{prefix}rewards/accuracies"), logs.get(f"{prefix}rewards/margins")
    if acc is None and margin is None:
        return ""
    return (f"  reward acc {acc:.0%}" if acc is not None else "") + (f"  margin {margin:+.3f}" if margin is not None
                                                                     else "")


def _sampled(logs: dict, prefix: str = "") -> str:
    """GRPO's numbers for its sampled completions (TRL's ``reward``, ``rewards/<name>/mean|std``, ``completions/*``,
    ``kl``): total reward with its spread, each reward's mean and spread, mean length, the truncated share, KL."""
    total = logs.get(f"{prefix}reward")
    if total is None:
        return ""
    parts = [f"reward {total:.3f}±{logs.get(f'{prefix}reward_std') or 0:.3f}"]
    start = f"{prefix}rewards/"
    for key in sorted(k for k in logs if k.startswith(start) and k.endswith("/mean") and logs[k] is not None):
        name = key[len(start):-len("/mean")]
        parts.append(f"{name} {logs[key]:.3f}±{logs.get(f'{start}{name}/std') or 0:.3f}")
    length, cut = logs.get(f"{prefix}completions/mean_length"), logs.get(f"{prefix}completions/clipped_ratio")
    if length is not None:
        parts.append(f"len {length:.1f}" + (f" ({cut:.0%} cut)" if cut is not None else ""))
    if logs.get(f"{prefix}kl") is not None:
        parts.append(f"kl {logs[f'{prefix}kl']:.4f}")
    return "  " + "  ".join(parts)


class RichProgress(TrainerCallback):
    """Step, loss (and, for preference methods, reward accuracy and margin), learning rate, tokens/s, peak memory
    and ETA; the numbers also land in ``self.history``."""

    def __init__(self, meter: PeakMemory):
        self.meter = meter
        self.history: list[dict] = []
        self._progress = None
        self._task = None
        self._active = False  # between train begin and end: the log lines are printed
        self._t0 = None
        self.tokens_at_start = 0
        self._last = {}

    def _tokens_per_second(self, state) -> float:
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        return (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0

    def metrics(self, state) -> dict:
        """Our own numbers for a logged row (and the trackers): speed since this session began, peak memory."""
        return {"tokens_per_second": self._tokens_per_second(state),
                "peak_memory_gib": self.meter.read().peak_reserved_gib}

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._t0 = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen
        self._active = True
        if not console().is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TextColumn("ETA"), TimeRemainingColumn(), console=console(), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=state.max_steps, completed=state.global_step, stats="")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # so the last line (and run.json's train_loss_end) are the last step's
        self._refresh(state)

    def _refresh(self, state) -> None:
        """The bar's line: the latest logged loss and learning rate, speed, peak memory."""
        if self._progress is None:
            return
        mem = self.meter.read()
        loss = f"{self._last['loss']:.4f}" if "loss" in self._last else "-"
        stats = f"loss {loss}  lr {self._last.get('lr', 0):.2e}  {self._tokens_per_second(state):,.0f} tok/s  " \
                f"{mem.short()}"
        self._progress.update(self._task, completed=state.global_step, stats=stats)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs:
            self._last["loss"] = logs["loss"]
        if "learning_rate" in logs:
            self._last["lr"] = logs["learning_rate"]
        mem = self.meter.read()
        row = {"step": state.global_step, **logs, **self.metrics(state)}
        self.history.append(row)
        if not self._active:
            return
        self._refresh(state)
        if "eval_loss" in logs:
            console().print(f"step {state.global_step:>5}  [cyan]eval loss {logs['eval_loss']:.4f}"
                            f"{_rewards(logs, 'eval_')}{_sampled(logs, 'eval_')}[/]")
        elif "loss" in logs:
            console().print(
                f"step {state.global_step:>5}  loss {logs['loss']:.4f}{_rewards(logs)}{_sampled(logs)}  lr "
                f"{logs.get('learning_rate', 0):.2e}  {row['tokens_per_second']:,.0f} tok/s  peak {mem.short()}")

    def on_train_end(self, args, state, control, **kwargs):
        self._active = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
