"""The few statistics `analyze` needs, in numpy, with scipy.special for the distribution tails.

Why not scipy.stats and statsmodels: importing them costs about 3 s of a 5 s budget on a
2-core machine (issue 12), for a Pearson r, a rank correlation and an OLS F-test. These
follow scipy's `pearsonr` / `spearmanr` and statsmodels' `grangercausalitytests`
(`ssr_ftest`) formula for formula, and the tests compare them against those libraries.
scipy.special (the same tail functions scipy.stats calls) is imported on first use.
"""

from __future__ import annotations

import numpy as np

from gradience.errors import require


def _special() -> object:
    require("scipy", "analysis")
    import scipy.special

    return scipy.special


def pearson_r_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (scipy.stats.pearsonr's exact beta test)."""
    xm, ym = x - x.mean(), y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = float(np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym)))
    r = max(-1.0, min(1.0, r))
    ab = x.size / 2.0 - 1.0  # r of independent normals: (r + 1) / 2 ~ Beta(n/2 - 1, n/2 - 1)
    p = 2.0 * float(_special().betainc(ab, ab, 0.5 * (1.0 - abs(r))))  # type: ignore[attr-defined]
    return r, min(p, 1.0)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (scipy.stats.rankdata's `average`)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    dense = first.cumsum()[np.argsort(order, kind="mergesort")]
    bounds = np.r_[np.nonzero(first)[0], len(first)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman_r_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman rho and its two-sided p-value (scipy.stats.spearmanr's t approximation)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rs = float(np.corrcoef(rx, ry)[0, 1])
    dof = x.size - 2
    with np.errstate(invalid="ignore", divide="ignore"):  # |rho| = 1: t = ±inf, p = 0
        t = rs * np.sqrt((np.float64(dof) / ((rs + 1.0) * (1.0 - rs))).clip(0))
    p = 2.0 * float(_special().stdtr(dof, -abs(t)))  # type: ignore[attr-defined]
    return rs, p


def granger_f(effect: np.ndarray, cause: np.ndarray, lag: int) -> tuple[float, float] | str:
    """statsmodels' `ssr_ftest` at one lag: (F, p), or why it cannot be computed.

    Regress effect[t] on a constant and effect[t-1..t-lag] (restricted), then also on
    cause[t-1..t-lag] (joint), over t = lag..n-1; F = (SSR_r - SSR_j) / lag / (SSR_j / df_j)
    with df_j = rows - rank(joint design), p = P(F(lag, df_j) > F).
    """
    n = effect.size
    rows = n - lag
    own = np.column_stack([effect[lag - k : n - k] for k in range(1, lag + 1)])
    other = np.column_stack([cause[lag - k : n - k] for k in range(1, lag + 1)])
    joint = np.column_stack([own, other])
    if np.any(np.ptp(joint, axis=0) == 0):  # statsmodels' InfeasibleTestError, same words
        return ("The x values include a column with constant values and so the test "
                "statistic cannot be computed.")  # fmt: skip
    y = effect[lag:]
    ones = np.ones((rows, 1))
    ssr_r, _ = _ols_ssr(y, np.hstack([own, ones]))
    ssr_j, rank_j = _ols_ssr(y, np.hstack([joint, ones]))
    df_j = rows - rank_j
    with np.errstate(invalid="ignore", divide="ignore"):
        f = float((ssr_r - ssr_j) / ssr_j / lag * df_j)
    p = float(_special().fdtrc(lag, df_j, f))  # type: ignore[attr-defined]
    return f, p


def _ols_ssr(y: np.ndarray, design: np.ndarray) -> tuple[float, int]:
    """Sum of squared residuals of the least-squares fit, and the design's rank."""
    beta, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ beta
    return float(resid @ resid), int(rank)
