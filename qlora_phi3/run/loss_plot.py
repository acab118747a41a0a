"""``loss.png`` beside ``run.json``: the train and eval loss per optimizer step, redrawn at each evaluation and at the
end of the run, so a run's curve can be looked at while it trains and after it, resumes included (it is drawn from
run.json's whole history).

matplotlib is imported only when a plot is drawn (its Agg backend: no display needed), through its object API
(no pyplot state shared with other plots of the same process), and the file is written beside itself and renamed,
so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LOSS_PLOT", "write_loss_plot"]

LOSS_PLOT = "loss.png"
LOG_SCALE_RANGE = 20  # a loss falling more than this many times over the run is drawn on a log scale


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(row["step"], row[key]) for row in history if row.get(key) is not None and "step" in row]
    return [s for s, _ in rows], [v for _, v in rows]


def write_loss_plot(history: list[dict], path: Path, title: str) -> Path | None:
    """Draw the ``loss`` and ``eval_loss`` rows of ``history`` (run.json's) against their step into ``path``;
    None (nothing written) while there is no loss yet."""
    train_steps, train_loss = _series(history, "loss")
    eval_steps, eval_loss = _series(history, "eval_loss")
    if not train_loss and not eval_loss:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_loss:
        ax.plot(train_steps, train_loss, color="#4c72b0", linewidth=1.2, label="train loss (per logged step)")
    if eval_loss:
        ax.plot(eval_steps, eval_loss, color="#c44e52", marker="o", linewidth=1.5, label="eval loss (held out)")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 0.5 on a short run's axis
    values = train_loss + eval_loss
    if min(values) > 0 and max(values) / min(values) > LOG_SCALE_RANGE:
        ax.set_yscale("log")  # the late steps, where runs differ, would lie flat on the axis of a linear scale
    ax.set_ylabel("loss (log scale)" if ax.get_yscale() == "log" else "loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")  # created by open(): the user's umask applies, as to every output
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
