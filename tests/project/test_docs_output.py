"""What the docs show a command printing is what it prints, wherever that is checkable offline: the estimator is
deterministic (config.json shapes and the recipe), so an estimate block in docs/ is compared byte for byte with the
command's output, and every predicted peak in the README's and docs' tables with the estimate or `fit` plan that
the table names. A change to the estimator or a recipe that moves a documented figure fails here until the page is
regenerated (`qlora-phi3 estimate ...` in a 100-column terminal, as each block says)."""

from __future__ import annotations

import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from qlora_phi3.cli.memory import show_estimate
from qlora_phi3.config import load_recipe
from qlora_phi3.memory.estimate import config_for_estimate, estimate
from qlora_phi3.memory.fit import plan_fit

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
WIDTH = 100  # the terminal width the documented blocks were printed at


@pytest.fixture(autouse=True)
def documented_machine(monkeypatch):
    """The machine the pages describe: a CPU without native bf16 (so fp32 on the CPU) and no flash-attn (so sdpa on
    a GPU); the estimator asks about nothing else."""
    monkeypatch.setattr("qlora_phi3.machine.cpu_bf16", lambda *a: (False, "the documented CPU: no native bf16"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))


def _output_blocks():
    """(page, line, argv, printed text) for each ```text block that opens with `$ qlora-phi3 estimate ...`."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if line.strip() == "```text" and n + 1 < len(lines) and lines[n + 1].startswith("$ qlora-phi3 estimate "):
                end = lines.index("```", n + 1)
                yield pytest.param(shlex.split(lines[n + 1][2:])[1:], "\n".join(lines[n + 2:end]) + "\n",
                                   id=f"{page.name}:{n + 2}")


def _render(argv: list[str]) -> str:
    from rich.console import Console

    from qlora_phi3.cli import _build

    _, commands = _build()
    args = commands["estimate"].parse_intermixed_args(argv[1:])
    from qlora_phi3.cli.common import recipe_from_args

    out = Console(width=WIDTH, file=io.StringIO(), color_system=None, highlight=False, soft_wrap=True)
    show_estimate(recipe_from_args(args), args.device, out)
    return out.file.getvalue()


@pytest.mark.parametrize(("argv", "documented"), list(_output_blocks()))
def test_documented_estimate_output_is_what_the_command_prints(argv, documented):
    printed = "\n".join(line.rstrip() for line in _render(argv).splitlines()) + "\n"
    assert printed == documented, f"regenerate the block: qlora-phi3 {shlex.join(argv)} (at {WIDTH} columns)"


def _table_rows(page: Path, header: str):
    """The rows (lists of cell texts) of the markdown table whose header line contains ``header``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and header in line)
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            return
        yield [c.strip() for c in line.strip("|").split("|")]


def _gib(cell: str) -> str | None:
    found = re.fullmatch(r"\**([\d.]+) GiB\**", cell)
    return found.group(1) if found else None


def test_predicted_peaks_in_recipe_tables_are_the_estimates():
    """README's recipe table and docs/preference.md's: each `name` with a GiB figure is `qlora-phi3 estimate name`'s
    peak (a GPU recipe: train.device auto, so CUDA)."""
    checked = []
    for page, header, column in ((REPO / "README.md", "predicted peak (`qlora-phi3 estimate`)", 4),
                                 (REPO / "docs" / "preference.md", "rows per forward", 2)):
        for cells in _table_rows(page, header):
            name, figure = cells[0].strip("`"), _gib(cells[column])
            if figure is None:
                continue
            recipe = load_recipe(name, [])
            est = estimate(recipe, config_for_estimate(recipe.model), "cuda")
            checked.append((page.name, name, figure, f"{est.total_gib:.2f}"))
    assert len(checked) >= 10
    wrong = [c for c in checked if c[2] != c[3]]
    assert not wrong, f"(page, recipe, documented, estimated): {wrong}"


def test_fit_table_in_memory_doc_is_what_fit_plans():
    """docs/memory.md's `qlora-phi3 fit phi3_mini_4k_12gb --budget B` table, row by row."""
    recipe = load_recipe("phi3_mini_4k_12gb", [])
    cfg = config_for_estimate(recipe.model)
    rows = list(_table_rows(REPO / "docs" / "memory.md", "| budget | max_seq_len |"))
    assert len(rows) >= 3
    for budget, seq, batch, ckpt, peak in rows:
        plan = plan_fit(recipe, cfg, float(budget.split()[0]))
        t = plan.recipe.train
        assert [seq, batch, ckpt, peak] == [f"{plan.recipe.data.max_seq_len}", f"{t.micro_batch_size} x {t.grad_accum}",
                                            "needed" if plan.checkpointing_needed else "not needed",
                                            f"{plan.predicted_gib:.2f} GiB"], budget


def test_the_block_walk_finds_blocks():
    """The comparison above cannot pass by finding nothing."""
    assert len(list(_output_blocks())) >= 1
