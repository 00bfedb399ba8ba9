"""The QR core and the metrics against closed-form ground truth at real shapes."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradience.spectrum import (
    NonFiniteFactors,
    _qr_core,
    cholesky_core,
    core_singular_values,
    core_svd,
    energy_rank,
    gram_singular_values,
    spectrum_metrics,
)
from tests.factories import expected_metrics, factors, orthonormal

REL = 1e-6


@pytest.mark.parametrize(
    ("out_features", "in_features", "r"),
    [(4096, 4096, 64), (1024, 4096, 64), (4096, 1024, 32), (64, 4096, 16)],
)
def test_metrics_match_closed_form_at_real_shapes(out_features: int, in_features: int, r: int) -> None:
    sigma = np.logspace(0, -8, r) * 3.7  # spans 1e-8 of sigma_max
    a, b = factors(out_features, in_features, sigma, r, scale=2.0, seed=r)
    got = core_singular_values(a, b, scale=2.0)
    # Every value above 1e-6 of sigma_max is recovered to 1e-6 relative...
    big = sigma > 1e-6 * sigma[0]
    np.testing.assert_allclose(got[big], sigma[big], rtol=REL)
    # ...the smallest ones to 1e-12 of sigma_max in absolute terms.
    np.testing.assert_allclose(got, sigma, atol=1e-12 * sigma[0], rtol=0)
    metrics = spectrum_metrics(got, r, (out_features, in_features)).to_dict()
    for key, value in expected_metrics(sigma, r, (out_features, in_features)).items():
        assert metrics[key] == pytest.approx(value, rel=REL), key


def test_bf16_factors_are_upcast_before_the_core() -> None:
    a, b = factors(256, 512, [4.0, 2.0, 1.0], 8, scale=1.0, seed=1)
    a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    got = core_singular_values(a16, b16)
    dense = np.linalg.svd(b16.astype(np.float64) @ a16.astype(np.float64), compute_uv=False)[:8]
    np.testing.assert_allclose(got, dense, rtol=1e-9, atol=1e-12)


def test_batched_call_equals_one_call_per_module() -> None:
    pairs = [factors(128, 96, [3.0, 1.0, 0.5], 4, 1.0, seed=s) for s in range(5)]
    stacked = core_singular_values(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    for i, (a, b) in enumerate(pairs):
        np.testing.assert_allclose(stacked[i], core_singular_values(a, b), rtol=1e-12)


def test_torch_tensors_take_the_same_path() -> None:
    torch = pytest.importorskip("torch")
    a, b = factors(300, 200, [5.0, 1.0, 1e-3], 6, 0.5, seed=3)
    got = core_singular_values(torch.from_numpy(a).float(), torch.from_numpy(b).float(), 0.5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    # float32 inputs: agreement to float32 precision of sigma_max
    np.testing.assert_allclose(got.numpy(), core_singular_values(a, b, 0.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("out_features", "in_features", "r"), [(4096, 4096, 32), (1024, 4096, 32), (64, 512, 16)])
def test_gram_route_keeps_every_structural_metric_to_six_digits(out_features: int, in_features: int, r: int) -> None:
    # The live snapshot's route, in float32 on the CPU as in training, against the closed form.
    torch = pytest.importorskip("torch")
    sigma = np.logspace(0, -8, min(r, in_features)) * 3.7
    a, b = factors(out_features, in_features, sigma, r, scale=2.0, seed=r)
    stacked = [torch.from_numpy(np.stack([x, x])).float() for x in (a, b)]
    got = gram_singular_values(*stacked, scale=2.0)
    assert got.dtype == np.float64 and got.shape == (2, len(sigma))
    # absolute precision in sigma squared (~float32 rounding of sigma_max squared), not in sigma
    np.testing.assert_allclose(got[0] ** 2, sigma**2, rtol=0, atol=1e-6 * sigma[0] ** 2)
    metrics = spectrum_metrics(got[1], r, (out_features, in_features)).to_dict()
    for key in ("frobenius_norm", "sigma_max", "stable_rank", "utilization", "energy_rank_90"):
        assert metrics[key] == pytest.approx(expected_metrics(sigma, r, (out_features, in_features))[key], rel=1e-6)


def test_gram_route_in_numpy_and_on_a_zero_or_rank_deficient_update() -> None:
    a, b = factors(50, 40, [2.0, 1.0], 6, 1.0, seed=4)  # rank 2 of 6: G_B is singular
    np.testing.assert_allclose(gram_singular_values(a, b) ** 2, core_singular_values(a, b) ** 2, rtol=0, atol=1e-14)
    assert not gram_singular_values(np.zeros((4, 9)), np.zeros((7, 4))).any()
    with pytest.raises(ValueError, match="rank mismatch"):
        gram_singular_values(np.zeros((4, 9)), np.zeros((7, 3)))


def test_rank_mismatch_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="rank mismatch"):
        core_singular_values(np.ones((4, 10)), np.ones((10, 3)))


def test_zero_update_is_flagged_not_divided_by() -> None:
    m = spectrum_metrics(np.zeros(8), 8, (16, 16))
    assert m.is_zero
    assert (m.stable_rank, m.utilization, m.energy_rank_90, m.effective_rank, m.numerical_rank) == (0, 0, 0, 0, 0)


@pytest.mark.parametrize(("fraction", "k"), [(0.9, 9), (0.91, 10), (0.1, 1), (0.5, 5), (1.0, 10)])
def test_energy_rank_has_no_off_by_one_on_flat_spectra(fraction: float, k: int) -> None:
    assert energy_rank(np.ones(10), fraction) == k


def test_energy_rank_counts_squared_values() -> None:
    # energies 16, 4, 1 of 21: the first value holds 76%, two hold 95%.
    assert energy_rank(np.array([4.0, 2.0, 1.0]), 0.75) == 1
    assert energy_rank(np.array([4.0, 2.0, 1.0]), 0.9) == 2
    with pytest.raises(ValueError):
        energy_rank(np.ones(3), 0.0)


def test_flat_spectrum_has_full_effective_and_stable_rank() -> None:
    m = spectrum_metrics(np.full(16, 2.0), 32, (64, 64))
    assert m.stable_rank == pytest.approx(16)
    assert m.effective_rank == pytest.approx(16)
    assert m.utilization == pytest.approx(0.5)
    assert m.frobenius_norm == pytest.approx(8.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8),
    st.floats(0.05, 20.0),
    st.integers(0, 2**31 - 1),
)
def test_core_agrees_with_a_dense_svd(sigma: list[float], scale: float, seed: int) -> None:
    r = len(sigma)
    a, b = factors(24, 20, sigma, r, scale, seed=seed)
    dense = np.linalg.svd(scale * b @ a, compute_uv=False)[:r]
    got = core_singular_values(a, b, scale)
    np.testing.assert_allclose(got, dense, rtol=1e-8, atol=1e-9 * max(sigma))


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_update_is_invariant_to_the_balance_between_a_and_b(c: float, seed: int) -> None:
    a, b = factors(32, 40, [2.0, 1.0, 0.25], 4, 1.0, seed=seed)
    np.testing.assert_allclose(core_singular_values(a * c, b / c), core_singular_values(a, b), rtol=1e-9, atol=1e-12)


def test_metrics_stay_in_their_ranges() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        r = int(rng.integers(1, 33))
        s = np.abs(rng.standard_normal(r)) * 10 ** rng.uniform(-3, 3)
        m = spectrum_metrics(s, r, (128, 128))
        assert 1.0 - 1e-12 <= m.stable_rank <= r + 1e-9
        assert 1 <= m.energy_rank_90 <= r
        assert 1.0 - 1e-9 <= m.effective_rank <= r + 1e-9
        assert math.isclose(m.utilization, m.stable_rank / r)


# --- core_svd: singular vectors from the same QR core -------------------------------------


@pytest.mark.parametrize(
    ("out_features", "in_features", "r", "scale"),
    [(12, 9, 4, 0.5), (9, 12, 4, 2.0), (3, 10, 5, 1.0), (10, 2, 5, 1.5), (6, 6, 6, -0.7), (1, 1, 1, 3.0)],
)
def test_core_svd_reconstructs_the_scaled_update(
    out_features: int, in_features: int, r: int, scale: float
) -> None:
    rng = np.random.default_rng(r + out_features)
    a = rng.standard_normal((r, in_features))
    b = rng.standard_normal((out_features, r))
    u, sigma, vt = core_svd(a, b, scale)
    k = min(out_features, in_features, r)
    assert u.shape == (out_features, k) and sigma.shape == (k,) and vt.shape == (k, in_features)
    np.testing.assert_allclose((u * sigma) @ vt, scale * b @ a, atol=1e-12 * np.abs(b @ a).max() + 1e-13)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-12)
    assert np.all(np.diff(sigma) <= 0) and np.all(sigma >= 0)
    np.testing.assert_allclose(sigma, core_singular_values(a, b, scale), rtol=1e-12, atol=1e-14)


def test_core_svd_truncation_is_the_best_rank_k_approximation() -> None:
    a, b = factors(40, 30, [5.0, 2.0, 1.0, 0.5], 4, scale=2.0, seed=11)
    u, sigma, vt = core_svd(a, b, 2.0)
    np.testing.assert_allclose(sigma, [5.0, 2.0, 1.0, 0.5], rtol=1e-12)
    dense = 2.0 * b @ a
    truncated = (u[:, :2] * sigma[:2]) @ vt[:2]
    # Eckart–Young: the Frobenius error of the top-2 truncation is the tail of the spectrum.
    assert np.linalg.norm(dense - truncated) == pytest.approx(math.hypot(1.0, 0.5), rel=1e-10)
    assert np.linalg.norm(dense - truncated, 2) == pytest.approx(1.0, rel=1e-10)


def test_core_svd_upcasts_bf16_and_handles_a_zero_update() -> None:
    a, b = factors(16, 24, [3.0, 1.0], 4, scale=1.0, seed=2)
    a16, b16 = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    u, sigma, vt = core_svd(a16, b16)
    assert u.dtype == sigma.dtype == vt.dtype == np.float64
    exact = b16.astype(np.float64) @ a16.astype(np.float64)
    np.testing.assert_allclose((u * sigma) @ vt, exact, atol=1e-12)
    u0, s0, vt0 = core_svd(np.zeros((3, 8)), np.zeros((5, 3)))
    assert np.all(s0 == 0) and u0.shape == (5, 3) and vt0.shape == (3, 8)
    with pytest.raises(ValueError, match="rank mismatch"):
        core_svd(np.ones((4, 10)), np.ones((10, 3)))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 6),
    st.floats(0.05, 20.0), st.integers(0, 2**31 - 1),
)
def test_core_svd_property_reconstruction_and_orthonormality(
    out_features: int, in_features: int, r: int, scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((r, in_features))
    b = rng.standard_normal((out_features, r))
    u, sigma, vt = core_svd(a, b, scale)
    dense = scale * b @ a
    np.testing.assert_allclose((u * sigma) @ vt, dense, atol=1e-10 * max(1.0, np.abs(dense).max()))
    k = sigma.shape[0]
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(sigma, core_singular_values(a, b, scale), rtol=1e-12, atol=1e-12)


# --- CholeskyQR and its guard: every metric exact to 1e-10, tiny values as exact as QR ------


def householder_singular_values(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The reference route: Householder QR of both factors, then the r×r core's SVD."""
    return np.linalg.svd(_qr_core(a, b, np)[2], compute_uv=False) * abs(scale)


def graded_factors(out_f: int, in_f: int, sigma: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with σ(B @ A) == sigma where B's columns carry the spectrum (B = U·diag(σ)·P,
    A = Pᵀ·Vᵀ, P a signed permutation): the shape of a trained B, well conditioned once its
    columns are scaled, however wide the spectrum."""
    rng = np.random.default_rng(seed)
    r = len(sigma)
    perm = np.eye(r)[rng.permutation(r)] * rng.choice([-1.0, 1.0], r)
    b = (orthonormal(rng, out_f, r) * sigma) @ perm
    a = perm.T @ orthonormal(rng, in_f, r).T
    return a, b


@pytest.mark.parametrize(("out_features", "in_features", "r"), [(4096, 4096, 32), (1024, 4096, 64), (14336, 4096, 16)])
def test_cholesky_route_matches_closed_form_to_1e_10(out_features: int, in_features: int, r: int) -> None:
    sigma = np.logspace(0, -8, r) * 3.7  # spans 1e-8 of sigma_max
    a, b = graded_factors(out_features, in_features, sigma, seed=r)
    assert cholesky_core(a, b) is not None  # column scaling makes both factors well conditioned
    got = core_singular_values(a, b, scale=2.0)
    # every metric to 1e-10 relative against the closed form
    metrics = spectrum_metrics(got, r, (out_features, in_features)).to_dict()
    for key, value in expected_metrics(2.0 * sigma, r, (out_features, in_features)).items():
        assert metrics[key] == pytest.approx(value, rel=1e-10), key
    # tiny singular values: no worse than Householder QR's, and within today's bound
    ref = householder_singular_values(a, b, 2.0)
    assert np.all(np.abs(got - 2.0 * sigma) <= np.abs(ref - 2.0 * sigma) + 1e-14 * sigma[0])
    np.testing.assert_allclose(got, 2.0 * sigma, atol=1e-12 * sigma[0], rtol=1e-10)


def test_cholesky_falls_back_when_b_has_zero_columns() -> None:
    a, b = factors(512, 384, [3.0, 1.0, 0.5], 8, 1.0, seed=11)
    b[:, [2, 5]] = 0.0  # trained B with dead columns: its Gram is singular
    assert cholesky_core(a, b) is None
    dense = np.linalg.svd(b @ a, compute_uv=False)[:8]
    got = core_singular_values(a, b)
    np.testing.assert_allclose(got, householder_singular_values(a, b), rtol=0, atol=0)
    np.testing.assert_allclose(got, dense, rtol=1e-10, atol=1e-13)
    assert spectrum_metrics(got, 8, (512, 384)).numerical_rank == int(np.sum(dense > dense[0] * 512 * 1.2e-7))


def test_cholesky_is_blind_to_a_times_1e6_and_b_times_1e_minus_6() -> None:
    sigma = np.logspace(0, -6, 32)
    a, b = graded_factors(4096, 1024, sigma, seed=5)
    assert cholesky_core(a * 1e6, b * 1e-6) is not None
    got = core_singular_values(a * 1e6, b * 1e-6)
    np.testing.assert_allclose(got, sigma, rtol=1e-10)
    np.testing.assert_allclose(got, householder_singular_values(a * 1e6, b * 1e-6), rtol=1e-10)


@pytest.mark.parametrize("gap", [1e-9, 1e-5, 1e-3])
def test_near_duplicate_columns_take_householder(gap: float) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16, 2048))
    b = rng.standard_normal((2048, 16))
    b[:, 7] = b[:, 3] + gap * rng.standard_normal(2048)  # cond(B) ~ 1/gap: CholeskyQR would square it
    assert cholesky_core(a, b) is None
    got = core_singular_values(a, b)
    np.testing.assert_array_equal(got, householder_singular_values(a, b))


def test_r_above_a_side_or_a_stack_with_one_bad_member_falls_back() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((8, 40)), rng.standard_normal((6, 8))  # out = 6 < r = 8
    assert cholesky_core(a, b) is None
    dense = np.linalg.svd(b @ a, compute_uv=False)
    np.testing.assert_allclose(core_singular_values(a, b), dense, rtol=1e-12)
    good = graded_factors(300, 200, np.array([3.0, 1.0, 0.1]), seed=0)
    bad_b = good[1].copy()
    bad_b[:, 1] = 0.0
    stack_a, stack_b = np.stack([good[0], good[0]]), np.stack([good[1], bad_b])
    assert cholesky_core(stack_a, stack_b) is None
    np.testing.assert_allclose(core_singular_values(stack_a, stack_b)[0], [3.0, 1.0, 0.1], rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 24),
    st.integers(24, 300),
    st.integers(24, 300),
    st.floats(-6, 6),
    st.floats(0.0, 12.0),
    st.integers(0, 2**31 - 1),
)
def test_both_routes_agree_on_random_scaled_factors(
    r: int, out_f: int, in_f: int, log_balance: float, spread: float, seed: int
) -> None:
    # Column scales spanning up to 1e12, a random balance between A and B, any shape: when the
    # guard lets Cholesky through, it agrees with Householder QR to 1e-10 relative on every value.
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((r, in_f)) * 10.0**log_balance
    b = rng.standard_normal((out_f, r)) * 10.0 ** rng.uniform(-spread, 0.0, r) / 10.0**log_balance
    ref = householder_singular_values(a, b)
    core = cholesky_core(a, b)
    if core is not None:
        np.testing.assert_allclose(np.linalg.svd(core, compute_uv=False), ref, rtol=1e-10)
    np.testing.assert_allclose(core_singular_values(a, b), ref, rtol=1e-10)


def test_gram_route_takes_cholesky_or_the_symmetric_root_with_the_same_values() -> None:
    from gradience.spectrum import singular_values_from_grams

    sigma = np.array([5.0, 2.0, 1.0, 0.5])
    a, b = graded_factors(512, 256, sigma, seed=9)
    g_a, g_b = a @ a.T, b.T @ b
    np.linalg.cholesky(g_b)  # positive definite: the Cholesky branch
    np.testing.assert_allclose(singular_values_from_grams(g_a, g_b, 4, scale=-2.0), 2.0 * sigma, rtol=1e-12)
    b[:, 1] = 0.0  # BᵀB singular: Cholesky fails, the symmetric root answers
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(b.T @ b)
    got = singular_values_from_grams(a @ a.T, b.T @ b, 4)
    np.testing.assert_allclose(got, np.linalg.svd(b @ a, compute_uv=False)[:4], rtol=0, atol=1e-12 * sigma[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["a", "b"])
def test_a_nan_or_infinity_anywhere_is_refused_not_reported(bad: float, where: str) -> None:
    """The Cholesky route never sees the bad value pass (its Gram diagonal goes non-finite),
    and the fallback scans explicitly, so every position is caught on either route."""
    rng = np.random.default_rng(3)
    for row, col in [(0, 0), (7, 1000), (15, 4095)]:
        a, b = rng.standard_normal((16, 4096)), rng.standard_normal((512, 16))
        if where == "a":
            a[row, col] = bad
        else:
            b[col % 512, row] = bad
        with pytest.raises(NonFiniteFactors):
            core_singular_values(a, b)


def test_finite_factors_whose_grams_overflow_still_get_a_spectrum() -> None:
    """Huge finite float64 entries overflow the Gram (inf) and leave the Cholesky route; the
    scan finds nothing wrong and Householder QR answers."""
    a = np.eye(2, 3) * 1e200
    b = np.diag([3.0, 1.0])
    np.testing.assert_allclose(core_singular_values(a, b), [3e200, 1e200], rtol=1e-12)
