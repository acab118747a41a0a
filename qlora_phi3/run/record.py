"""What a run records about itself: package versions, device, and atomic JSON writes."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

__all__ = ["atomic_write_json", "device_info", "package_versions"]

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
        return {"kind": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "ram_gib": round(ram, 1) if ram else None}
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"kind": "cuda", "name": props.name, "vram_gib": round(props.total_memory / 1024**3, 2),
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


def atomic_write_json(path: Path, data: dict) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a JSON file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; run records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
