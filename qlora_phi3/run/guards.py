"""What stops a run early, on purpose: non-finite loss or gradients, and Ctrl-C / SIGTERM.

Both are ``TrainerCallback``s because the Trainer owns the loop; they either raise (NaN/inf: stop at once,
before the optimizer step can spread the damage into the weights) or ask the Trainer to save and stop
at the end of the current step (first Ctrl-C).
"""

from __future__ import annotations

import math
import signal
import threading

import torch
from transformers import TrainerCallback

__all__ = ["GracefulInterrupt", "NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(Exception):
    def __init__(self, step: int, what: str, since: int | None = None):
        where = f"at step {step}" if since is None or since >= step - 1 else f"between steps {since + 1} and {step}"
        super().__init__(f"non-finite {what} {where}")
        self.step = step
        self.what = what


class NonFiniteGuard(TrainerCallback):
    """Stop on the first NaN/inf loss or gradient, before a checkpoint can hold it.

    Each step's gradients are checked on the device before the optimizer step, without waiting for the
    GPU (a host sync per step stalls the queue of kernels); the verdict is read every ``check_every``
    steps and before every save, evaluation and log. So a saved checkpoint never holds a NaN, and on a CPU
    (``check_every=1``) the run stops at the very step. Under fp16 loss scaling an inf gradient is expected
    now and then (the scaler skips that step and lowers the scale), so there only the logged loss is checked.
    """

    def __init__(self, fp16: bool, check_every: int = 1):
        self.fp16 = fp16
        self.check_every = max(1, check_every)
        self._bad = None  # device bool: a non-finite gradient since the last read
        self._checked_step = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.fp16 or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads:
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))
            self._bad = bad if self._bad is None else self._bad | bad

    def on_step_end(self, args, state, control, **kwargs):
        due = (state.global_step % self.check_every == 0 or control.should_save or control.should_evaluate
               or control.should_log or control.should_training_stop or state.global_step >= state.max_steps)
        if self._bad is not None and due:
            bad, self._bad = bool(self._bad), None
            if bad:
                raise NonFiniteError(state.global_step, "gradient", since=self._checked_step)
            self._checked_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteError(state.global_step, key.replace("_", " "))


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C (or SIGTERM): finish the step, save a checkpoint, stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt  # second signal: stop now; the last complete checkpoint stays valid
        self.requested = True
        from qlora_phi3.ui import warn

        warn("interrupt received: saving a checkpoint after this step, then stopping "
             "(press Ctrl-C again to stop at once).")

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
