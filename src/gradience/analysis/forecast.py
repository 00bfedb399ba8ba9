"""Ridge forecasts of eval loss from structural metrics, scored out of sample.

Two questions, both on a time-ordered split (train on the first part of the run, score on
the rest; never shuffled, so the model is not shown the future):

- nowcast: eval loss at step t from the structure at step t ("could structure stand in
  for this eval?");
- one-step-ahead: eval loss at the next eval step from the structure now.

Each is scored by out-of-sample R² next to a persistence baseline that predicts each eval
loss by the previous one (the last eval you would have run). A model that does not beat
persistence adds nothing over evaluating less often.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradience.analysis._finite import fin

MIN_TRAIN = 3
MIN_TEST = 2


@dataclass(frozen=True, eq=False)
class RidgeModel:
    """y ≈ intercept + ((X - mean) / scale) @ coef, fitted in closed form."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(features) - self.mean) / self.scale
        return self.intercept + z @ self.coef


def ridge_fit(features: np.ndarray, target: np.ndarray, alpha: float = 1.0) -> RidgeModel:
    """Closed-form ridge on standardised features: coef = (ZᵀZ + αI)⁻¹ Zᵀ(y − ȳ).

    Why standardise: the penalty should treat a norm in the hundreds and a rank near 3
    alike. A constant column gets scale 1 and so contributes nothing. The intercept is
    not penalised.

    Example:
        >>> X = np.arange(10.0).reshape(-1, 1)
        >>> float(np.round(ridge_fit(X, 2 * X[:, 0] + 1, alpha=0.0).predict([[20.0]])[0], 6))
        41.0
    """
    if alpha < 0:
        raise ValueError(f"`alpha` must be >= 0, got {alpha}")
    X = np.atleast_2d(np.asarray(features, dtype=np.float64))
    y = np.asarray(target, dtype=np.float64)
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z = (X - mean) / scale
    gram = Z.T @ Z + alpha * np.eye(Z.shape[1])
    coef = np.linalg.lstsq(gram, Z.T @ (y - y.mean()), rcond=None)[0]
    return RidgeModel(mean, scale, coef, float(y.mean()), float(alpha))


def r2_score(actual: np.ndarray, predicted: np.ndarray) -> float | None:
    """1 − SSE/SST about the mean of `actual`; None when `actual` is constant."""
    actual = np.asarray(actual, dtype=np.float64)
    sst = float(((actual - actual.mean()) ** 2).sum())
    if sst == 0.0:
        return None
    return fin(1.0 - float(((actual - predicted) ** 2).sum()) / sst)


@dataclass(frozen=True)
class ForecastScore:
    """Out-of-sample R² of the ridge model and of persistence on the same held-out evals."""

    horizon: int
    r2: float | None
    persistence_r2: float | None
    n_train: int
    n_test: int
    reason: str | None = None

    @property
    def beats_persistence(self) -> bool | None:
        if self.r2 is None or self.persistence_r2 is None:
            return None
        return self.r2 > self.persistence_r2

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "beats_persistence": self.beats_persistence}


def split_index(n: int, train_fraction: float) -> int:
    """Rows [0, i) train and [i, n) test, clamped so both sides keep their minimum."""
    return min(max(int(np.floor(n * train_fraction)), MIN_TRAIN), n - MIN_TEST)


def ridge_forecast(
    features: np.ndarray,
    eval_loss: np.ndarray,
    horizon: int = 0,
    alpha: float = 1.0,
    train_fraction: float = 0.7,
) -> ForecastScore:
    """Fit on the first part of the run, score R² on the rest, next to persistence.

    Args:
        features: (n, p) structural metrics at n consecutive eval steps (exactly aligned).
        eval_loss: (n,) eval loss at the same steps.
        horizon: 0 predicts eval loss at the same step, 1 at the next eval step.
        alpha: ridge penalty on standardised features.
        train_fraction: share of rows (in time order) used for fitting.

    Returns:
        `ForecastScore`; R² values are None with a `reason` when there are too few rows.

    Example:
        >>> X = np.linspace(0, 1, 40).reshape(-1, 1)
        >>> round(ridge_forecast(X, 3 * X[:, 0], alpha=1e-6).r2, 6)
        1.0
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"`train_fraction` must be in (0, 1), got {train_fraction}")
    if horizon < 0:
        raise ValueError(f"`horizon` must be >= 0, got {horizon}")
    X = np.atleast_2d(np.asarray(features, dtype=np.float64))
    y = np.asarray(eval_loss, dtype=np.float64)
    if X.shape[0] != y.size:
        raise ValueError(f"features have {X.shape[0]} rows but eval_loss has {y.size}")
    # Row i: features at eval i, target at eval i + horizon, persistence = the eval before it.
    rows = y.size - horizon
    first = 1 if horizon == 0 else 0  # persistence needs a previous eval
    m = rows - first
    if m < MIN_TRAIN + MIN_TEST:
        reason = f"{m} usable row(s); need at least {MIN_TRAIN + MIN_TEST}"
        return ForecastScore(horizon, None, None, 0, 0, reason)
    idx = np.arange(first, rows)
    Xr, yr, prev = X[idx], y[idx + horizon], y[idx + horizon - 1]
    cut = split_index(m, train_fraction)
    model = ridge_fit(Xr[:cut], yr[:cut], alpha)
    test = slice(cut, m)
    return ForecastScore(
        horizon=horizon,
        r2=r2_score(yr[test], model.predict(Xr[test])),
        persistence_r2=r2_score(yr[test], prev[test]),
        n_train=int(cut),
        n_test=int(m - cut),
    )
