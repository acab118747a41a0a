"""bench/compare.py's arithmetic (no training): shapes, FLOPs per token, and the ratio it derives for Phi-3-mini
from one shape's measured seconds, which docs/speed.md and the README quote."""

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench.compare import PHI3_MINI, derive_real_ratio, flops_per_token, parse_shape  # noqa: E402


def _side(steps_s: float, head_s: float, real: int, padded: int) -> dict:
    return {"steps_seconds": steps_s, "head_seconds": head_s, "tokens": real, "padded_tokens": padded}


def test_shapes_and_flops():
    assert parse_shape("4x768") == (4, 768)
    for bad in ("4x700", "0x768", "768"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shape(bad)
    body, head = flops_per_token(*PHI3_MINI)
    assert body == 32 * 2 * (4 * 3072**2 + 3 * 3072 * 8192) and head == 2 * 3072 * 32064
    assert 36 < body / head < 37  # the head is ~2.6% of Phi-3-mini's matmul FLOPs


def test_one_layer_at_the_real_width_scales_by_the_layer_count():
    # Reference: 100 real + 300 padding tokens, 40 s of body and 20 s of head; ours: 100 real tokens, 10 s + 2 s.
    row = {"layers": 1, "hidden": 3072, "reference": _side(60.0, 20.0, 100, 300), "ours": _side(12.0, 2.0, 100, 0)}
    ref_per_real = (32 * 40.0 + 20.0) / 100
    ours_per_real = (32 * 10.0 + 2.0) / 100
    assert derive_real_ratio(row) == pytest.approx(ref_per_real / ours_per_real)
    assert derive_real_ratio(row, target=(1, 3072)) == pytest.approx(60.0 / 12.0)  # its own shape: the measured ratio
    # Another padding share (e.g. the full-length set's): each side's seconds per computed token, over real ones.
    ref_computed, ours_computed = (32 * 40.0 + 20.0) / 400, (32 * 10.0 + 2.0) / 100
    expected = (ref_computed / (1 - 0.5)) / (ours_computed / (1 - 0.1))
    assert derive_real_ratio(row, (0.5, 0.1)) == pytest.approx(expected)
