"""Sizes as people read them: the one rule for the service's messages and for ``modelctl``."""

from __future__ import annotations


def human_bytes(count: int, decimal: bool = False) -> str:
    """``1.5 GiB`` (binary units, the service's messages), or with ``decimal`` ``1.6 GB`` (as
    ``hf`` and ``modelctl`` print sizes); one decimal, whole bytes below the first unit."""
    step, units = (
        (1000, ("B", "KB", "MB", "GB", "TB"))
        if decimal
        else (
            1024,
            ("B", "KiB", "MiB", "GiB", "TiB"),
        )
    )
    value = float(count)
    for unit in units:
        if abs(value) < step or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= step
    raise AssertionError("unreachable")
