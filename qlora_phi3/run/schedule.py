"""The learning rate on resume: the step the schedule says, not the one the checkpoint stopped at.

A resume may raise ``train.max_steps`` (a completed run's own message suggests it). The Trainer then builds the
schedule for the new length and loads the checkpoint into it, but the optimizer's state holds the learning rate
of the old schedule's last step (0 at the end of a cosine or linear decay): the first resumed step trained at
that rate, and only the next one at the new schedule's. Setting the rate from the new schedule at the resumed
step fixes it; with ``max_steps`` unchanged the two rates are the same number, so nothing changes.
"""

from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["LearningRateOnResume", "resync_learning_rate"]


def resync_learning_rate(optimizer, lr_scheduler) -> bool:
    """Give each parameter group the rate ``lr_scheduler`` computes at its current step; False when the scheduler
    is not a per-step lambda schedule (every one ``train.lr_scheduler`` offers is)."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if optimizer is None or not lambdas or not all(callable(f) for f in lambdas):
        return False
    step = lr_scheduler.last_epoch
    rates = [base * f(step) for base, f in zip(lr_scheduler.base_lrs, lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    lr_scheduler._last_lr = rates  # what get_last_lr() (the logged rate) reports until the next step
    return True


class LearningRateOnResume(TrainerCallback):
    """After the Trainer has loaded a checkpoint's optimizer and scheduler (before the first resumed step)."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step > 0:
            resync_learning_rate(optimizer, lr_scheduler)
