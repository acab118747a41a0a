"""Console output: one rich console, and the few message shapes every command uses."""

from __future__ import annotations

import os

__all__ = ["console", "error", "info", "is_main_process", "warn"]

_console = None


def is_main_process() -> bool:
    """Rank 0 (or no distributed launch at all): the only process that prints and writes outputs."""
    return os.environ.get("RANK", "0") == "0"


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(highlight=False, soft_wrap=True, quiet=not is_main_process())
    return _console


def info(msg: str) -> None:
    console().print(msg)


def warn(msg: str) -> None:
    console().print(f"[bold yellow]warning:[/] {msg}")


def error(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(msg)}")
