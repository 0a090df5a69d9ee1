"""Human-friendly sizes, as users write them on command lines and in policies."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """'256MiB' or '256M' -> 268435456 bytes (binary units); '1GB' -> 10**9 (decimal units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"size {text!r} is not a size: write it like 64MiB, 256M or 1GiB")
    number, unit, binary = match.groups()
    power = _POWERS[unit.lower()]
    base = 1000 if unit and not binary and text.strip().upper().endswith("B") else 1024
    return int(float(number) * base ** power)


def format_size(size: int) -> str:
    """268435456 -> '256.0 MiB': for people reading tables and logs."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
