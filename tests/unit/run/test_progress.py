"""Output that is not a terminal (a pipe, a log file, CI): whole lines, no bar cut to 80 columns."""

from types import SimpleNamespace

import pytest

from qlora_phi3 import ui
from qlora_phi3.run.progress import RichProgress


@pytest.fixture
def piped(monkeypatch):
    """The console as a command in a pipe gets it (pytest's capture is not a terminal)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(ui, "_console", None)
    yield
    ui._console = None


class _Meter:
    def read(self):
        return SimpleNamespace(peak_reserved_gib=0.8, short=lambda: "0.799 GiB RSS (process peak, sampled)")


def test_training_lines_are_whole_and_there_is_no_bar(piped, capsys):
    progress = RichProgress(_Meter())
    args, control = SimpleNamespace(), SimpleNamespace(should_log=False)
    state = SimpleNamespace(num_input_tokens_seen=0, max_steps=300, global_step=0)
    progress.on_train_begin(args, state, control)
    for step in (1, 300):
        state.global_step, state.num_input_tokens_seen = step, 640 * step
        progress.on_step_end(args, state, control)
        progress.on_log(args, state, control, logs={"loss": 12.345678, "learning_rate": 6e-3})
    progress.on_log(args, state, control, logs={"eval_loss": 0.0741})
    progress.on_train_end(args, state, control)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("step     1  loss 12.3457  lr 6.00e-03")
    assert lines[1].endswith("peak 0.799 GiB RSS (process peak, sampled)")  # the whole line, not cut at 80
    assert lines[2] == "step   300  eval loss 0.0741"
    assert not any("ETA" in line or "…" in line or "..." in line for line in lines)


def test_tables_keep_every_column_whole(piped, capsys):
    from rich.table import Table

    table = Table(title="a table wider than 80 columns")
    for name in ("setting", "value", "why"):
        table.add_column(name)
    table.add_row("train.max_steps", "300", "the recipe's default, which reaches eval loss 0.12 on the bundled set "
                                            "of synthetic conversations in about a minute")
    ui.console().print(table)
    out = capsys.readouterr().out
    assert "in about a minute" in out and "…" not in out
    assert max(len(line) for line in out.splitlines()) > 80
