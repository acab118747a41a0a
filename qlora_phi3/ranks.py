"""Which process of a distributed launch this is: only the main one (rank 0) prints and writes outputs."""

from __future__ import annotations

import os

__all__ = ["is_main_process", "world_size"]


def is_main_process() -> bool:
    """Rank 0 (or no distributed launch at all): the only process that prints and writes outputs."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """Processes in the launch (torchrun / accelerate set WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
