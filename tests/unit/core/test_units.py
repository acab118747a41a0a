"""Memory sizes with their true units: GB = 10^9 bytes, GiB = 2^30 bytes; a unit is required."""

import pytest

from qlora_phi3.errors import UserError
from qlora_phi3.units import gib, parse_size


@pytest.mark.parametrize("text,n_bytes", [("12GiB", 12 * 2**30), ("12GB", 12 * 10**9), (" 24 gib ", 24 * 2**30),
                                          ("12000MB", 12 * 10**9), ("11.5GiB", int(11.5 * 2**30)),
                                          ("500MiB", 500 * 2**20), ("2gb", 2 * 10**9)])
def test_parse_size(text, n_bytes):
    assert parse_size(text, "--budget") == n_bytes


def test_a_12gb_card_is_12gib_and_12gb_is_less():
    assert gib(parse_size("12GiB", "--budget")) == 12
    assert gib(parse_size("12GB", "--budget")) == pytest.approx(11.176, abs=1e-3)


@pytest.mark.parametrize("bad", ["twelve", "12XB", "", "-4GB", "0GB", "12", "11.5"])
def test_bad_sizes_name_the_flag_and_the_units(bad):
    with pytest.raises(UserError, match=r"--budget .*(GiB|more than zero)"):
        parse_size(bad, "--budget")
