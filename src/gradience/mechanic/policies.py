"""Rank policies: how many singular directions of one update to keep.

Each policy is a pure function of a singular-value vector (plus the update's (out, in)
shape where the method needs it) that returns a rank. `audit` and `compress` share them
through the `POLICIES` registry, so a rank means the same thing wherever it is printed.

Every policy returns 0 for an all-zero (or empty) spectrum and otherwise a rank in
[1, len(sigma)]: a nonzero update always keeps its leading direction. Inputs are sorted
descending first, so the order they arrive in does not matter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from gradience.spectrum import effective_rank as _effective_rank_value
from gradience.spectrum import energy_rank

# A chord distance this small (relative to the unit square) means the cumulative-energy
# curve is a straight line: a flat spectrum has no knee, and keeps everything.
_FLAT_TOL = 1e-12


def _sorted(sigma: np.ndarray) -> np.ndarray:
    """Descending and divided by σ₁: every policy is scale-invariant, and σ² cannot underflow."""
    s = np.sort(np.abs(np.asarray(sigma, dtype=np.float64).ravel()))[::-1]
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite")
    return s / s[0] if s.size and s[0] > 0.0 else s


def _is_zero(s: np.ndarray) -> bool:
    return s.size == 0 or float(s[0]) <= 0.0


def energy(sigma: np.ndarray, q: float = 0.9) -> int:
    """Smallest k whose top-k values hold fraction `q` of the energy Σσ² (`spectrum.energy_rank`).

    Example:
        >>> energy(np.array([4.0, 2.0, 1.0]), 0.9)  # energies 16, 4, 1: two hold 95%
        2
    """
    return energy_rank(_sorted(sigma), q)


def knee(sigma: np.ndarray) -> int:
    """The knee of the cumulative-energy curve: the point farthest from its chord.

    The curve is c_k = Σ_{i≤k} σᵢ² / Σσ² at x_k = k/n, for k = 0..n, which runs from (0, 0)
    to (1, 1) and is concave because σ is sorted descending. The knee is the k ≥ 1 with the
    largest distance to the chord y = x, i.e. the largest c_k − k/n (the perpendicular
    distance is that divided by √2); ties go to the smaller k. A straight curve (a flat
    spectrum) has no knee: every direction carries the same energy, so all n are kept.

    Example:
        >>> knee(np.array([1.0, 1.0, 0.01, 0.01]))
        2
    """
    s = _sorted(sigma)
    if _is_zero(s):
        return 0
    n = s.size
    energy_curve = np.cumsum(np.square(s)) / float(np.sum(np.square(s)))
    distance = energy_curve - np.arange(1, n + 1) / n
    best = float(np.max(distance))
    if best <= _FLAT_TOL:
        return n
    return int(np.flatnonzero(distance >= best - _FLAT_TOL)[0]) + 1


def effective_rank(sigma: np.ndarray) -> int:
    """exp(H(p)) with pᵢ = σᵢ / Σσ (Roy and Vetterli), rounded half up, in [1, n].

    Example:
        >>> effective_rank(np.array([1.0, 1.0, 1.0, 0.0]))
        3
    """
    s = _sorted(sigma)
    if _is_zero(s):
        return 0
    return min(s.size, max(1, math.floor(_effective_rank_value(s) + 0.5)))


def gavish_donoho_omega(beta: float) -> float:
    """ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43 (Gavish and Donoho 2014, unknown noise level)."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"aspect ratio beta must be in (0, 1], got {beta}")
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def optimal_hard_threshold(sigma: np.ndarray, shape: tuple[int, int]) -> int:
    """Gavish–Donoho optimal hard threshold with unknown noise: keep σ > ω(β) · median(σ).

    β = min(out, in) / max(out, in) is the aspect ratio of the *update* matrix ΔW, from
    `shape` = (out, in).

    Caveat: the method assumes the median is taken over all min(out, in) singular values
    of a noisy full matrix, most of them noise. A rank-r factored update has only r nonzero
    values, and the median here is over those r: it estimates the noise level from the
    update's own bulk, so the threshold is much higher than for a dense matrix and the rank
    is a conservative (low) one. A flat spectrum, which this reading takes for pure noise,
    keeps its leading direction only.

    Example:
        >>> optimal_hard_threshold(np.array([10.0, 9.0, 1.0, 1.0, 1.0]), (64, 64))
        2
    """
    s = _sorted(sigma)
    if _is_zero(s):
        return 0
    out_features, in_features = int(shape[0]), int(shape[1])
    if out_features <= 0 or in_features <= 0:
        raise ValueError(f"update shape must be positive, got {tuple(shape)}")
    beta = min(out_features, in_features) / max(out_features, in_features)
    tau = gavish_donoho_omega(beta) * float(np.median(s))
    return min(s.size, max(1, int(np.count_nonzero(s > tau))))


@dataclass(frozen=True)
class Policy:
    """A named rank policy with one signature: (sigma, (out, in)) -> rank."""

    name: str
    rank: Callable[[np.ndarray, tuple[int, int]], int]
    help: str

    def __call__(self, sigma: np.ndarray, shape: tuple[int, int]) -> int:
        return self.rank(sigma, shape)


POLICIES: Mapping[str, Policy] = MappingProxyType({
    "energy": Policy(
        "energy", lambda s, shape: energy(s, 0.9),
        "smallest k holding 90% of Σσ² (use energy() for other fractions)",
    ),
    "knee": Policy("knee", lambda s, shape: knee(s), "knee of the cumulative-energy curve (max distance to the chord)"),
    "effective_rank": Policy(
        "effective_rank", lambda s, shape: effective_rank(s), "round(exp(entropy of σ/Σσ))"
    ),
    "optimal_hard_threshold": Policy(
        "optimal_hard_threshold", optimal_hard_threshold,
        "Gavish–Donoho: keep σ > ω(β)·median(σ), median over the r stored values",
    ),
})


def get_policy(name: str) -> Policy:
    """The registered policy `name`; ValueError listing the known names otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown rank policy {name!r}; known: {', '.join(POLICIES)}") from None
