"""Median and linear percentile of a short list, equal to numpy's to the last bit.

`np.median` and `np.percentile` import `numpy.ma` on first use (a NaN check inside
`np.unique`): ~15 ms of a whole `gradience audit` that has nothing masked. These give the
same values with the same arithmetic (numpy's "linear" method and its two-sided lerp), so
switching to them moves no reported figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _sorted(xs: Iterable[float], what: str) -> list[float]:
    s = sorted(float(x) for x in xs)
    if not s:
        raise ValueError(f"{what} of an empty sequence")
    return s


def percentile(xs: Iterable[float], q: float) -> float:
    """`float(np.percentile(xs, q))` for a non-empty sequence of floats, q in [0, 100]."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = _sorted(xs, "percentile")
    if any(math.isnan(x) for x in s):
        return math.nan  # as numpy: one NaN makes the percentile NaN
    n = len(s)
    frac = q / 100.0
    virtual = (n - 1) * frac  # numpy's virtual index for its default "linear" method
    if virtual >= n - 1:  # at or past the last point numpy returns it exactly
        return s[-1]
    if virtual < 0:
        return s[0]
    lo = math.floor(virtual)
    gamma = virtual - lo
    a, b = s[lo], s[lo + 1]
    diff = b - a
    # numpy's _lerp: from below for t < 0.5, from above otherwise (monotone, exact at the ends).
    return b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma


def median(xs: Iterable[float]) -> float:
    """`float(np.median(xs))` for a non-empty sequence of floats."""
    s = _sorted(xs, "median")
    if any(math.isnan(x) for x in s):
        return math.nan  # as numpy: one NaN makes the median NaN
    n = len(s)
    if n % 2:
        return s[n // 2]
    return (s[n // 2 - 1] + s[n // 2]) / 2.0
