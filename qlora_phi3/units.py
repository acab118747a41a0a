"""Memory sizes as people write them, with their true meaning: GB = 10^9 bytes, GiB = 2^30 bytes.

A "12 GB" graphics card has 12 GiB (12,288 MiB, what nvidia-smi shows): to give its full size write
``12GiB``; ``12GB`` means 12 x 10^9 bytes = 11.18 GiB, a little less. Every size we print says GiB.
"""

from __future__ import annotations

import re

from qlora_phi3.errors import UserError

__all__ = ["GIB", "gib", "parse_size"]

GIB = 1024**3
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


def parse_size(text: str, what: str) -> int:
    """Bytes in ``text`` ('12GiB', '12GB', '11.5 GiB', '500MB'); ``what`` names the flag in the error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{what} {text!r} is not a memory size with a unit; write it like 12GiB (2^30 bytes each, "
                        "how GPU memory is counted) or 12GB (10^9 bytes each), or 500MiB / 500MB.")
    n_bytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n_bytes <= 0:
        raise UserError(f"{what} {text!r} must be more than zero.")
    return n_bytes
