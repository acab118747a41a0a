"""run/schedule.py: a resume that raises train.max_steps trains its first step at the new schedule's rate."""

from types import SimpleNamespace

import pytest
import torch
from transformers import get_scheduler

from qlora_phi3.run.schedule import LearningRateOnResume


def _optimizer_and_schedule(kind: str, steps: int):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    return opt, get_scheduler(kind, opt, num_warmup_steps=1, num_training_steps=steps)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup"])
def test_resumed_with_more_steps_the_first_step_takes_the_new_schedules_rate(kind):
    opt, sched = _optimizer_and_schedule(kind, 4)
    for _ in range(4):  # the first run: 4 steps, checkpointed at its end
        opt.step()
        sched.step()
    saved = opt.state_dict(), sched.state_dict()
    opt2, sched2 = _optimizer_and_schedule(kind, 6)  # resumed with train.max_steps=6, as the Trainer loads it
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    fresh_opt, fresh = _optimizer_and_schedule(kind, 6)  # the 6-step schedule's own rate at step 4
    for _ in range(4):
        fresh_opt.step()
        fresh.step()
    want = fresh_opt.param_groups[0]["lr"]
    LearningRateOnResume().on_train_begin(None, SimpleNamespace(global_step=4), None, optimizer=opt2,
                                          lr_scheduler=sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(want) and sched2.get_last_lr() == pytest.approx([want])
    if kind != "constant_with_warmup":
        assert want > 0 and saved[0]["param_groups"][0]["lr"] == 0  # what the first resumed step used to train at


def test_a_fresh_run_is_left_alone():
    opt, sched = _optimizer_and_schedule("cosine", 4)
    before = opt.param_groups[0]["lr"]
    LearningRateOnResume().on_train_begin(None, SimpleNamespace(global_step=0), None, optimizer=opt,
                                          lr_scheduler=sched)
    assert opt.param_groups[0]["lr"] == before
