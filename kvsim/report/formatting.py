"""Number formatting shared by the HTML page and the chart labels."""

from __future__ import annotations

import math
from typing import Any

KiB = 1024
MiB = 1024 * KiB


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def format_count(value: Any) -> str:
    """Format an integer with thousands separators: 1834560 → "1,834,560", and a dash when missing."""
    if _is_missing(value):
        return "—"
    return f"{round(float(value)):,}"


def format_number(value: Any, significant: int = 3) -> str:
    """Format a float to `significant` figures, without an exponent: 95.25 → "95.2"."""
    if _is_missing(value):
        return "—"
    number = float(value)
    if number == 0:
        return "0"
    if abs(number) >= 10 ** significant:
        return f"{round(number):,}"
    decimals = max(significant - 1 - math.floor(math.log10(abs(number))), 0)
    text = f"{number:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def format_percent(fraction: Any, decimals: int = 1) -> str:
    """Format a fraction as a percentage: 0.612 → "61.2 %"."""
    if _is_missing(fraction):
        return "—"
    return f"{float(fraction) * 100:.{decimals}f} %"


def format_duration_s(seconds: Any) -> str:
    """Format a duration in seconds in µs, ms or s: 0.0423 → "42.3 ms", 1.5 → "1.5 s"."""
    if _is_missing(seconds):
        return "—"
    value = float(seconds)
    if value == 0:
        return "0 s"
    if abs(value) < 1e-3:
        return f"{format_number(value * 1e6)} µs"
    if abs(value) < 1:
        return f"{format_number(value * 1e3)} ms"
    return f"{format_number(value)} s"


def format_bytes(num_bytes: Any) -> str:
    """Format a byte count in binary units: 327680 → "320 KiB"."""
    if _is_missing(num_bytes):
        return "—"
    value = float(num_bytes)
    if abs(value) >= MiB:
        return f"{format_number(value / MiB)} MiB"
    if abs(value) >= KiB:
        return f"{format_number(value / KiB)} KiB"
    return f"{format_count(value)} B"


def format_ratio(value: Any) -> str:
    """Format a ratio as a multiple: 4.27 → "4.3×"."""
    if _is_missing(value):
        return "—"
    return f"{format_number(value, 2)}×"
