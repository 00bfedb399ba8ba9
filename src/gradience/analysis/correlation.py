"""Same-step correlation (Pearson, Spearman) and cross-correlation over lags.

Lag convention (used everywhere in `gradience.analysis`, in JSON and in the CLI):

    ccf[k] = corr(x[t], y[t + k]),  x = structure, y = eval loss, t = eval index

so a **positive lag k means structure LEADS eval loss** by k eval intervals (structure at
step t moves with eval loss k evals later), a negative lag means structure LAGS, and 0 is
synchronous. Beware: `statsmodels.tsa.stattools.ccf(x, y)[k]` is corr(x[t + k], y[t]),
the opposite sign. Carried-forward (stale) structural values look like structure lagging
by one interval in this convention, i.e. +1 in the statsmodels one.

Basis: cross-correlation is computed on first differences by default. Training curves
trend (loss falls, norms grow), and two trending series correlate at every lag, so in
levels the peak is flat and the ±1.96/√n band (which assumes white noise) means little.
Differencing removes the shared trend; levels stay available for comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from gradience.analysis._finite import fin, fin_list

Basis = Literal["levels", "differences"]
BASES: tuple[Basis, ...] = ("levels", "differences")
LAG_CONVENTION = (
    "ccf[k] = corr(structure[t], eval_loss[t+k]); k > 0: structure LEADS eval loss by k "
    "eval intervals, k < 0: structure LAGS, 0: synchronous"
)
MIN_POINTS = 3


@dataclass(frozen=True)
class Correlation:
    """A same-step correlation; `r` and `p` are None (with a `reason`) when undefined."""

    r: float | None
    p: float | None
    n: int
    reason: str | None = None


def _undefined(x: np.ndarray, y: np.ndarray) -> str | None:
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    if x.size < MIN_POINTS:
        return f"{x.size} point(s); need at least {MIN_POINTS}"
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return "a constant series has no correlation"
    return None


def pearson(x: np.ndarray, y: np.ndarray) -> Correlation:
    """Pearson r and its two-sided p-value (scipy.stats.pearsonr's test), on exactly the pairs given.

    Example:
        >>> pearson(np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 8])).r
        1.0
    """
    return _corr("pearsonr", np.asarray(x, float), np.asarray(y, float))


def spearman(x: np.ndarray, y: np.ndarray) -> Correlation:
    """Spearman rank correlation and its p-value (scipy.stats.spearmanr's test)."""
    return _corr("spearmanr", np.asarray(x, float), np.asarray(y, float))


def _corr(name: str, x: np.ndarray, y: np.ndarray) -> Correlation:
    reason = _undefined(x, y)
    if reason is not None:
        return Correlation(None, None, int(x.size), reason)
    from gradience.analysis._stats import pearson_r_p, spearman_r_p

    raw_r, raw_p = (pearson_r_p if name == "pearsonr" else spearman_r_p)(x, y)
    r, p = fin(raw_r), fin(raw_p)
    if r is not None:
        r = min(1.0, max(-1.0, r))  # rounding can leave |r| a hair above 1
    return Correlation(r, p, int(x.size), None if r is not None else "undefined (NaN)")


def transform(values: np.ndarray, basis: Basis) -> np.ndarray:
    """The series a lag analysis runs on: `values` itself, or its first differences."""
    if basis not in BASES:
        raise ValueError(f"`basis` must be one of {', '.join(BASES)}, got {basis!r}")
    arr = np.asarray(values, dtype=np.float64)
    return np.diff(arr) if basis == "differences" else arr


def cross_correlation(x: np.ndarray, y: np.ndarray, max_lag: int) -> np.ndarray:
    """ccf[k] = corr(x[t], y[t+k]) for k = -max_lag..max_lag (index k + max_lag).

    The standard (biased) estimator: full-series means and a 1/n normalisation, so the
    ±1.96/√n white-noise band applies and long lags, with fewer pairs, are shrunk.
    """
    n = x.size
    xc, yc = x - x.mean(), y - y.mean()
    scale = float(np.sqrt((xc @ xc) * (yc @ yc)))
    out = np.full(2 * max_lag + 1, np.nan)
    if scale == 0.0:
        return out
    for k in range(-max_lag, max_lag + 1):
        if abs(k) >= n:
            continue
        pairs = xc[: n - k] @ yc[k:] if k >= 0 else xc[-k:] @ yc[: n + k]
        out[k + max_lag] = pairs / scale
    return out


def best_lag(lags: np.ndarray, values: np.ndarray) -> int | None:
    """Lag of the largest |ccf|; ties go to the smaller |lag|, then to the negative one.

    Why that tie-break: on a tie, the answer that claims no lead is the one to report.
    """
    ok = np.isfinite(values)
    if not ok.any():
        return None
    mags = np.where(ok, np.abs(values), -1.0)
    top = mags.max()
    candidates = [
        int(k) for k, m in zip(lags, mags, strict=True) if np.isclose(m, top, rtol=0, atol=1e-12)
    ]
    return min(candidates, key=lambda k: (abs(k), k))


@dataclass(frozen=True)
class Ccf:
    """Cross-correlation of structure and eval loss on one basis (see `LAG_CONVENTION`)."""

    basis: Basis
    n: int
    lags: tuple[int, ...]
    values: tuple[float | None, ...]
    band: float | None
    best_lag: int | None
    best_value: float | None
    significant: bool
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ccf(x: np.ndarray, y: np.ndarray, max_lag: int = 3, basis: Basis = "differences") -> Ccf:
    """Cross-correlation over lags -max_lag..max_lag with a ±1.96/√n band and the best lag.

    Args:
        x: structure at consecutive eval steps (exactly aligned, no gaps filled).
        y: eval loss at the same steps.
        max_lag: largest |lag|, in eval intervals.
        basis: "differences" (default; removes shared trends) or "levels".

    Returns:
        `Ccf`; `significant` says whether |ccf| at the best lag exceeds the band.

    Example:
        >>> x = np.random.default_rng(0).standard_normal(60).cumsum()
        >>> ccf(x[2:], x[:-2], max_lag=3).best_lag  # y[t] = x[t-2]: structure leads by 2
        2
    """
    if max_lag < 0:
        raise ValueError(f"`max_lag` must be >= 0, got {max_lag}")
    bx, by = transform(x, basis), transform(y, basis)
    lags = tuple(range(-max_lag, max_lag + 1))
    n = int(bx.size)
    empty = (None,) * len(lags)
    if n < max_lag + MIN_POINTS:
        reason = (
            f"{n} {basis} point(s); need at least {max_lag + MIN_POINTS} for lags up to {max_lag}"
        )
        return Ccf(basis, n, lags, empty, None, None, None, False, reason)
    band = 1.96 / float(np.sqrt(n))
    if np.ptp(bx) == 0 or np.ptp(by) == 0:
        return Ccf(basis, n, lags, empty, band, None, None, False, "a constant series")
    values = cross_correlation(bx, by, max_lag)
    lag = best_lag(np.array(lags), values)
    best = fin(values[lag + max_lag]) if lag is not None else None
    significant = best is not None and abs(best) > band
    return Ccf(basis, n, lags, tuple(fin_list(values)), band, lag, best, significant)
