"""The run record, ``<output_dir>/run.json``: what a run is, how far it got and how it ended.

One object owns the file. It is written atomically at every change of state, so at any moment it
says the truth about the run: ``status`` is ``running`` (possibly killed without a word),
``completed``, ``interrupted`` (Ctrl-C: a checkpoint was saved) or ``failed`` (with ``failure``).
Only rank 0 writes under a distributed launch.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from qlora_phi3.files import atomic_write_json
from qlora_phi3.ranks import is_main_process

__all__ = ["ADAPTER_META", "BASE_SHAPE_KEYS", "RECIPE_FILE", "RUN_FILE", "RunRecord", "device_info", "package_versions", "read_run"]

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe a run was started with (and resumes with)
ADAPTER_META = "qlora_phi3.json"  # beside the adapter: its base model, revision and shapes
# The base model's shapes recorded beside an adapter: merge/chat refuse a base whose shapes differ.
BASE_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size", "max_position_embeddings")
STATES = ("running", "completed", "interrupted", "failed")
PACKAGES = ("qlora-phi3", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
            "flash-attn")


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: str) -> dict:
    if device == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
        except (ValueError, OSError):
            ram = None
        from qlora_phi3.machine import cpu_flags, usable_cores

        flags = cpu_flags()
        return {"kind": "cpu", "name": _cpu_name(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
                "bf16_flags": sorted(f for f, on in flags.items() if on), "ram_gib": round(ram, 1) if ram else None}
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"kind": "cuda", "name": props.name, "vram_gib": round(props.total_memory / 1024**3, 2),
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


def _cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_run(run_dir: Path) -> dict:
    """The run record in ``run_dir`` ({} if there is none or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class RunRecord:
    """``run.json`` of one run. ``update`` merges fields and writes; ``end`` sets the final status."""

    def __init__(self, run_dir: Path, fields: dict):
        self.path = Path(run_dir) / RUN_FILE
        self.data = {"status": "running", **fields}
        self.wall_before = 0.0  # the earlier sessions' wall time, when this run continues one (--resume)

    def wall_seconds(self, t_start: float) -> float:
        """The run's wall time: this session's since ``t_start`` (time.perf_counter) plus the earlier sessions'."""
        return round(self.wall_before + time.perf_counter() - t_start, 2)

    def update(self, **fields) -> None:
        self.data.update(fields)
        self._write()

    def end(self, status: str, **fields) -> None:
        if status not in STATES[1:]:
            raise ValueError(f"a run ends completed, interrupted or failed, not {status!r}")
        self.data.update(fields, status=status)
        self._write()

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def _write(self) -> None:
        if is_main_process():
            atomic_write_json(self.path, self.data)
