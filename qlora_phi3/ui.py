"""Console output: one rich console, and the few message shapes every command uses."""

from __future__ import annotations

import os

__all__ = ["console", "error", "info", "is_main_process", "plural", "quiet_library_noise", "status_to_stderr", "warn"]

from qlora_phi3.ranks import is_main_process

_console = None
_stderr = False
# Not a terminal (a pipe, a log file, CI): rich would assume 80 columns and cut tables and the progress line
# ("300...", "ETA 0:00:..."). There every line is printed whole, up to this many characters, unless COLUMNS says.
PIPE_WIDTH = 1000


def status_to_stderr(on: bool = True) -> None:
    """Send every status line and warning to stderr, for commands whose stdout is their result
    (``chat --prompt ... > answer.txt``); ``on=False`` goes back to stdout (each command starts there)."""
    global _console, _stderr
    _stderr, _console = on, None


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(highlight=False, soft_wrap=True, quiet=not is_main_process(), stderr=_stderr)
        if not _console.is_terminal and not os.environ.get("COLUMNS"):
            _console.width = PIPE_WIDTH
    return _console


def info(msg: str) -> None:
    console().print(msg)


def warn(msg: str) -> None:
    """A warning, printed as written: its text is never rich markup (``pip install 'qlora-phi3[gguf]'`` keeps
    its brackets)."""
    from rich.markup import escape

    console().print(f"[bold yellow]warning:[/] {escape(msg)}")


def error(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(msg)}")


def plural(n: int, word: str, plural_form: str | None = None) -> str:
    """'1 optimizer step', '2 optimizer steps', '1,200 conversations'."""
    return f"{n:,} {word if n == 1 else plural_form or word + 's'}"


def quiet_library_noise() -> None:
    """Silence specific library messages that only confuse (each one named here), never whole categories:
    a FutureWarning that announces an API change must still reach the user."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # Checkpointing and a KV cache cannot coexist; training turns the cache off itself (on the live config only).
    warnings.filterwarnings("ignore", message=".*use_cache=True.*is incompatible with gradient checkpointing.*")
    # run/train.py says this itself, once, in words that name our setting.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` at every wrap; it is PEFT's to change, not
    # the user's, and qlora-phi3 itself never calls it (tests/unit/cli/test_cli.py checks our own code stays clean).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # TRL's DPO/KTO reference pass turns checkpointing off and on through transformers' deprecated names at every
    # step (trl.trainer.utils.disable_gradient_checkpointing); TRL's to change, not the user's.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing_(disable|enable)` is deprecated",
                            category=FutureWarning)
    # bitsandbytes looks for an optional CPU kernel package at import and logs its absence on every start.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "Failed to load CPU gemm_4bit_forward" not in record.getMessage())
    # ... through the `kernels` package (a transformers dependency since 5.25), which offline (ours, or the user's
    # HF_HUB_OFFLINE) announces at every start that it skips a publisher check for that optional kernel.
    logging.getLogger("kernels._internals.hf_hub").addFilter(
        lambda record: "Skipping publisher trust check" not in record.getMessage())
