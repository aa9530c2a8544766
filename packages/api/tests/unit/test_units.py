"""Sizes as people read them: one rule for the service's messages (binary units) and for
``modelctl`` (decimal units, as ``hf`` prints them)."""

from __future__ import annotations

import pytest

from api.units import human_bytes


@pytest.mark.parametrize(
    ("count", "binary", "decimal"),
    [
        (0, "0 B", "0 B"),
        (999, "999 B", "999 B"),
        (1000, "1000 B", "1.0 KB"),
        (1024, "1.0 KiB", "1.0 KB"),
        (16_000_000_000, "14.9 GiB", "16.0 GB"),
        (5 * 1024**5, "5120.0 TiB", "5629.5 TB"),
    ],
)
def test_sizes_in_both_units(count: int, binary: str, decimal: str) -> None:
    assert human_bytes(count) == binary
    assert human_bytes(count, decimal=True) == decimal
