"""How numbers read on screen: short, aligned, and the same in every panel."""

from __future__ import annotations

import math


def human_bytes(count: int | float) -> str:
    """1536 -> '1.5 KiB'; binary units, as memory is counted."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(count: int | float) -> str:
    """1_234_567 -> '1.23 M'; for parameter and MAC totals where the exact figure is noise."""
    value = float(count)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{int(value)}"


def grouped(count: int) -> str:
    """1234567 -> '1,234,567'; exact figures in tables, where digits line up."""
    return f"{count:,}"


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


def short_float(value: float) -> str:
    """Four significant digits, switching to exponent form for very small or large values."""
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def percent(fraction: float) -> str:
    if math.isnan(fraction):
        return "—"
    if 0 < fraction < 0.001:
        return "<0.1 %"
    return f"{fraction * 100:.1f} %"
