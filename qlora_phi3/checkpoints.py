"""Finding the checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

__all__ = ["last_checkpoint"]


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (one with its trainer state written)."""
    done = [p for p in Path(output_dir).glob("checkpoint-*")
            if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
