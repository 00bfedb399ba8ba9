"""Granger causality between structure and eval loss, in both directions.

"x Granger-causes y" means past x improves a linear forecast of y beyond past y alone;
it is a statement about predictability on this series, not about mechanism. Each direction
is statsmodels' `grangercausalitytests` F-test (`ssr_ftest`, computed in numpy the same way:
`gradience.analysis._stats`) at lags 1..max_lag, reported
as one p-value per lag and the smallest of them (uncorrected for testing several lags).
Like the cross-correlation, it runs on first differences by default: the test assumes
stationary series, and trending levels give spurious "causality".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradience.analysis._finite import fin
from gradience.analysis.correlation import Basis, transform


@dataclass(frozen=True)
class GrangerTest:
    """Does `cause` Granger-cause `effect`? F-test p-value at each lag 1..max_lag."""

    cause: str
    effect: str
    lags: tuple[int, ...]
    f_values: tuple[float | None, ...]
    p_values: tuple[float | None, ...]
    min_p: float | None
    lag_at_min_p: int | None


@dataclass(frozen=True)
class Granger:
    """Both directions; a direction is None (and `reason` says why) when it cannot be run."""

    basis: Basis
    max_lag: int
    n: int
    structure_to_eval: GrangerTest | None
    eval_to_structure: GrangerTest | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def min_points(max_lag: int) -> int:
    """Fewest observations statsmodels accepts for `max_lag` lags (with a constant)."""
    return 3 * max_lag + 4


def granger_test(
    cause: np.ndarray, effect: np.ndarray, max_lag: int, names: tuple[str, str] = ("x", "y")
) -> tuple[GrangerTest | None, str | None]:
    """One direction: does `cause` help predict `effect`? (already on the chosen basis)

    Returns:
        `(GrangerTest, None)`, or `(None, reason)` for a series too short or degenerate
        for the regression; it never raises for data reasons.
    """
    cause, effect = np.asarray(cause, float), np.asarray(effect, float)
    n = int(cause.size)
    if max_lag < 1:
        return None, f"`max_lag` must be >= 1 for a Granger test, got {max_lag}"
    if n < min_points(max_lag):
        return None, f"{n} point(s); Granger with lags up to {max_lag} needs {min_points(max_lag)}"
    if np.ptp(cause) == 0 or np.ptp(effect) == 0:
        return None, "a constant series"
    from gradience.analysis._stats import granger_f

    results = []
    for lag in range(1, max_lag + 1):
        try:
            got = granger_f(effect, cause, lag)
        except np.linalg.LinAlgError as exc:  # least squares did not converge
            got = str(exc)
        if isinstance(got, str):
            return None, f"test not computable: {got[:120]}"
        results.append(got)
    lags = tuple(range(1, max_lag + 1))
    f_values = tuple(fin(f) for f, _ in results)
    p_values = tuple(fin(p) for _, p in results)
    finite = [(p, k) for p, k in zip(p_values, lags, strict=True) if p is not None]
    min_p, at = min(finite) if finite else (None, None)
    return GrangerTest(names[0], names[1], lags, f_values, p_values, min_p, at), None


def granger(
    structure: np.ndarray, eval_loss: np.ndarray, max_lag: int = 3, basis: Basis = "differences"
) -> Granger:
    """Granger tests structure → eval loss and eval loss → structure.

    Args:
        structure, eval_loss: values at the same consecutive eval steps (exact alignment).
        max_lag: largest lag tested, in eval intervals.
        basis: "differences" (default) or "levels".

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s = rng.standard_normal(200).cumsum()
        >>> e = np.r_[0.0, s[:-1]] + 0.1 * rng.standard_normal(200).cumsum()
        >>> g = granger(s, e, max_lag=2)
        >>> g.structure_to_eval.min_p < 0.01 < g.eval_to_structure.min_p
        True
    """
    x, y = transform(structure, basis), transform(eval_loss, basis)
    s_to_e, why_s = granger_test(x, y, max_lag, ("structure", "eval_loss"))
    e_to_s, why_e = granger_test(y, x, max_lag, ("eval_loss", "structure"))
    reason = why_s if why_s == why_e else "; ".join(r for r in (why_s, why_e) if r) or None
    return Granger(basis, max_lag, int(x.size), s_to_e, e_to_s, reason)
