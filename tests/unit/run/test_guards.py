"""The NaN/inf guard (run/guards.py): stops before a bad update is saved, without a GPU sync every step."""

import pytest
import torch
from transformers import TrainerControl, TrainerState

from qlora_phi3.run.guards import NonFiniteError, NonFiniteGuard


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def grads(self, value: float):
        self.w.grad = torch.full((3,), value)


def _step(guard, model, state, step: int, grad: float, **control_flags):
    state.global_step = step - 1
    model.grads(grad)
    guard.on_pre_optimizer_step(None, state, TrainerControl(), model=model)
    state.global_step = step
    guard.on_step_end(None, state, TrainerControl(**control_flags))


def test_checked_every_n_steps_and_before_every_save():
    model, state = _Model(), TrainerState(max_steps=100)
    guard = NonFiniteGuard(fp16=False, check_every=4)
    _step(guard, model, state, 1, 0.5)
    _step(guard, model, state, 2, float("nan"))  # bad, but not read yet: no host sync on this step
    _step(guard, model, state, 3, 0.5)
    with pytest.raises(NonFiniteError, match="non-finite gradient between steps 1 and 4"):
        _step(guard, model, state, 4, 0.5)

    guard = NonFiniteGuard(fp16=False, check_every=4)
    _step(guard, model, state, 1, float("inf"))
    with pytest.raises(NonFiniteError, match="between steps 1 and 2"):
        _step(guard, model, state, 2, 0.5, should_save=True)  # a checkpoint is due: read the verdict first


def test_every_step_on_the_cpu_and_fp16_leaves_inf_to_the_loss_scaler():
    model, state = _Model(), TrainerState(max_steps=100)
    guard = NonFiniteGuard(fp16=False, check_every=1)
    _step(guard, model, state, 1, 1.0)
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 2"):
        _step(guard, model, state, 2, float("nan"))
    scaled = NonFiniteGuard(fp16=True, check_every=1)
    _step(scaled, model, state, 1, float("inf"), should_save=True)  # the GradScaler skips this step itself
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        scaled.on_log(None, state, TrainerControl(), logs={"loss": float("nan")})
