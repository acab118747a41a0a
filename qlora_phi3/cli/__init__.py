"""The ``qlora-phi3`` command: parses arguments, dispatches to the library, prints what it returns.

One module per group of commands (``train``, ``data``, ``memory``: estimate/fit/profile, ``eval``, ``out``:
merge/chat, ``recipes``). Each imports the library only when its command runs, so ``--help`` answers
at once. Flags and ``key=value`` overrides may come in any order.
"""

from __future__ import annotations

import argparse
import os
import sys

from qlora_phi3 import __version__
from qlora_phi3.cli import data, memory, out, recipes, train
from qlora_phi3.cli import eval as eval_command
from qlora_phi3.errors import UserError

__all__ = ["build_parser", "main"]

# Each module adds its commands to the parser, in the order of the workflow (the README's order).
_GROUPS = (recipes, data, memory, train, eval_command, out)


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own parser."""
    parser = argparse.ArgumentParser(
        prog="qlora-phi3",
        description="QLoRA fine-tuning of Microsoft's Phi-3 family (Phi-3-mini, Phi-3.5-mini, Phi-3-medium, "
                    "Phi-4-mini, Phi-4 and the reasoning models): supervised, on preferences or with GRPO rewards, "
                    "on one consumer GPU (or offline on a CPU).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Workflow: data -> estimate / fit -> train -> eval -> merge -> chat -> export. "
               "Run `qlora-phi3 COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"qlora-phi3 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    # Before anything can initialise CUDA: expandable segments cut fragmentation on small cards.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _build()
    if argv and argv[0] in commands:
        # Intermixed: `estimate RECIPE --budget 12GiB lora.r=16` works as well as overrides before flags.
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)  # --help, --version, or an unknown command (argparse's message)
        parser.print_help()
        return 0
    from qlora_phi3.ui import quiet_library_noise, status_to_stderr

    quiet_library_noise()  # before any library is imported: some speak at import time
    status_to_stderr(False)  # a command that prints its result on stdout (chat --prompt) turns this on
    try:
        return args.func(args) or 0
    except UserError as e:
        from qlora_phi3.ui import error

        error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        from qlora_phi3.ui import error

        error("interrupted.")
        return 130
    finally:
        status_to_stderr(False)
