"""Rank policies on constructed spectra: exact ranks, boundaries and the range property."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradience.mechanic.policies import (
    POLICIES,
    effective_rank,
    energy,
    gavish_donoho_omega,
    get_policy,
    knee,
    optimal_hard_threshold,
)

# --- energy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "k"),
    # energies 16, 4, 1 of 21: cumulative 16/21 = 0.7619, 20/21 = 0.9524, 1
    [(0.5, 1), (16 / 21, 1), (0.77, 2), (20 / 21, 2), (0.96, 3), (1.0, 3)],
)
def test_energy_at_any_fraction_is_exact_at_the_boundaries(q: float, k: int) -> None:
    assert energy(np.array([4.0, 2.0, 1.0]), q) == k


def test_energy_sorts_its_input_and_rejects_bad_fractions() -> None:
    assert energy(np.array([1.0, 4.0, 2.0]), 0.9) == 2
    with pytest.raises(ValueError):
        energy(np.ones(3), 1.5)


# --- knee ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "k"),
    [
        ([1.0, 0.0, 0.0, 0.0], 1),
        ([1.0, 1.0, 0.0, 0.0], 2),
        ([1.0, 1.0, 1.0, 0.0], 3),
        ([3.0, 3.0, 3.0, 0.1, 0.1, 0.1, 0.1, 0.1], 3),
        ([1.0], 1),
        ([2.0, 2.0, 2.0, 2.0], 4),  # flat: no knee, keep all
    ],
)
def test_knee_on_step_spectra(sigma: list[float], k: int) -> None:
    assert knee(np.array(sigma)) == k


def test_knee_is_the_max_distance_to_the_chord() -> None:
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    c = np.cumsum(s**2) / np.sum(s**2)
    x = np.arange(1, 7) / 6
    expected = int(np.argmax((c - x) / math.sqrt(2))) + 1  # perpendicular distance to y = x
    assert knee(s) == expected == 2


# --- effective rank ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "k"),
    [([1.0, 1.0, 1.0, 0.0], 3), ([1.0], 1), ([5.0, 1e-9, 1e-9], 1), ([1.0] * 16, 16)],
)
def test_effective_rank_rounds_exp_entropy(sigma: list[float], k: int) -> None:
    assert effective_rank(np.array(sigma)) == k


def _exp_entropy(sigma: list[float]) -> float:
    p = np.array(sigma) / sum(sigma)
    return math.exp(-float(np.sum(p * np.log(p))))


def test_effective_rank_rounds_to_the_nearest_integer() -> None:
    above, below = [1.0, 0.2], [1.0, 0.1]
    assert 1.5 < _exp_entropy(above) < 1.6 and 1.3 < _exp_entropy(below) < 1.4
    assert effective_rank(np.array(above)) == 2
    assert effective_rank(np.array(below)) == 1


# --- optimal hard threshold ----------------------------------------------------------------


def test_gavish_donoho_omega_matches_the_paper_at_square_and_thin() -> None:
    assert gavish_donoho_omega(1.0) == pytest.approx(2.86)  # ≈ 2.858 in the paper's table
    assert gavish_donoho_omega(0.5) == pytest.approx(0.07 - 0.2375 + 0.91 + 1.43)
    with pytest.raises(ValueError):
        gavish_donoho_omega(0.0)


def test_optimal_hard_threshold_counts_values_above_tau() -> None:
    sigma = np.array([10.0, 9.0, 1.0, 1.0, 1.0])  # median 1
    assert optimal_hard_threshold(sigma, (64, 64)) == 2  # tau = 2.86
    # the aspect ratio is that of the update: (out, in) = (16, 64) gives beta = 0.25
    beta = 0.25
    tau = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43  # ≈ 1.83
    s = np.array([4.0, tau + 1e-9, tau - 1e-9, 1.0, 1.0, 1.0, 1.0])  # median 1
    assert optimal_hard_threshold(s, (16, 64)) == 2
    assert optimal_hard_threshold(s, (64, 16)) == 2  # symmetric in (out, in)
    assert optimal_hard_threshold(s, (64, 64)) == 1  # square: tau = 2.86


def test_optimal_hard_threshold_keeps_one_direction_of_a_flat_spectrum() -> None:
    assert optimal_hard_threshold(np.ones(8), (32, 32)) == 1


# --- zero spectra, the registry and the range property ----------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_zero_and_empty_spectra_give_rank_zero(name: str) -> None:
    policy = get_policy(name)
    assert policy(np.zeros(4), (8, 8)) == 0
    assert policy(np.zeros(0), (8, 8)) == 0


def test_registry_names_and_unknown_policy() -> None:
    assert set(POLICIES) == {"energy", "knee", "effective_rank", "optimal_hard_threshold"}
    assert get_policy("energy")(np.array([4.0, 2.0, 1.0]), (8, 8)) == 2
    with pytest.raises(ValueError, match="knee"):
        get_policy("kneee")


@settings(max_examples=200, deadline=None)
@given(
    sigma=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=32).filter(
        lambda s: max(s) > 0.0
    ),
    out_features=st.integers(1, 4096),
    in_features=st.integers(1, 4096),
)
def test_every_policy_returns_a_rank_between_one_and_n(
    sigma: list[float], out_features: int, in_features: int
) -> None:
    s = np.array(sigma)
    for name, policy in POLICIES.items():
        k = policy(s, (out_features, in_features))
        assert isinstance(k, int), name
        assert 1 <= k <= len(sigma), (name, k)
    for q in (0.01, 0.5, 0.9, 0.999, 1.0):
        assert 1 <= energy(s, q) <= len(sigma)
