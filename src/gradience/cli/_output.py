"""Rendering helpers shared by the commands: data to stdout, hints to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

RULE = "=" * 72


def emit_json(data: Any) -> None:
    """Print a result's `to_dict()` (or a plain dict) as JSON, finite numbers only."""
    payload = data.to_dict() if hasattr(data, "to_dict") else data
    print(json.dumps(payload, indent=2, allow_nan=False))


def header(title: str) -> list[str]:
    return [RULE, title, RULE]


def human_count(n: float) -> str:
    """294912 -> '294.9K'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if float(x).is_integer():
        return f"{int(x)}"
    return f"{x:.{digits}f}"


def hint(message: str) -> None:
    print(message, file=sys.stderr)
