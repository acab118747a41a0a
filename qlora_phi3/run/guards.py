"""What stops a run early, on purpose: non-finite loss or gradients, and Ctrl-C / SIGTERM.

Both are ``TrainerCallback``s because the Trainer owns the loop; they either raise (NaN/inf: stop at once,
before the optimizer step can spread the damage into the weights) or ask the Trainer to save and stop
at the end of the current step (first Ctrl-C).
"""

from __future__ import annotations

import math
import signal
import threading

from transformers import TrainerCallback

__all__ = ["GracefulInterrupt", "NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(Exception):
    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step = step
        self.what = what


class NonFiniteGuard(TrainerCallback):
    """Raise on the first NaN/inf loss or gradient.

    Gradients are checked before each optimizer step. Under fp16 loss scaling an inf gradient is expected
    now and then (the scaler skips that step and lowers the scale), so there only the logged loss is checked.
    """

    def __init__(self, fp16: bool):
        self.fp16 = fp16

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.fp16 or model is None:
            return
        import torch

        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise NonFiniteError(state.global_step + 1, "gradient")

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
