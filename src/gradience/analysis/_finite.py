"""Finite numbers only: every float that leaves `gradience.analysis` passes through here."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def fin(value: Any) -> float | None:
    """`value` as a Python float, or None when it is missing, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def fin_list(values: Iterable[Any]) -> list[float | None]:
    return [fin(v) for v in values]
