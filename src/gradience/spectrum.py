"""Singular values of a factored LoRA update, and every metric derived from them.

A LoRA update is ΔW = s · B · A with A: (r, in) and B: (out, r). Its singular values are
those of the r×r core R_B · R_Aᵀ, where B = Q_B R_B and Aᵀ = Q_A R_A are thin QR
factorisations: the orthonormal factors do not change singular values. That costs
O((in + out) · r²) and never forms the out×in matrix.

On numpy arrays the R factors come from Cholesky of the float64 Gram matrices BᵀB and AAᵀ
(CholeskyQR: BLAS-3 products, about 3x faster than Householder QR here), guarded: when a
Gram is singular or its column-scaled condition number is large, where CholeskyQR loses
accuracy (error about eps · cond²), the factor pair goes through Householder QR instead.

This is the only place in Gradience that computes a spectrum. The core works on numpy
arrays and, unchanged, on torch tensors (the training callback passes live weights on
their device), stacked or not: a batch of modules of equal shape is one call.
`core_svd` lifts the same core's singular vectors back through the Q factors (numpy only),
for the tools that re-factor updates (compress, merge).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)
# Cumulative-energy comparisons tolerate this much relative rounding, so that a spectrum
# whose first k values hold exactly q of the energy reports k, not k + 1.
_ENERGY_RTOL = 1e-12


class NonFiniteFactors(ValueError):
    """lora_A or lora_B holds a NaN or an infinity: the update has no spectrum to report."""


def _namespace(x: Any) -> Any:
    """The array module of `x`: numpy, or torch when `x` is a torch tensor (never imported here)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch
    return np


# CholeskyQR's relative error on every singular value is about (m + r) · eps · cond(C) in the
# worst case, C the Gram with unit diagonal (Cholesky and the Gram product are exact up to a
# column scaling). Capping the bound on cond(C) at 100 keeps that under 1e-10 up to m = 4096
# rows (1e-12 typical: rounding errors add like a random walk); past it, Householder QR.
_CHOLESKY_MAX_COND = 100.0


def _upcast(x: Any, xp: Any) -> Any:
    if xp is np:
        return np.asarray(x, dtype=np.float64)
    return x.to(xp.float64)


def _cholesky_r(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(L, d) with gram = (d L)(d L)ᵀ row-wise, i.e. R = Lᵀ · diag(d) is the QR R factor up to
    signs; None where Cholesky is not accurate to 1e-10: a zero column, a failed
    factorisation, or a bound on the column-scaled condition number over `_CHOLESKY_MAX_COND`.
    """
    d = np.sqrt(np.diagonal(gram, axis1=-2, axis2=-1))
    if not np.all(d > 0.0) or not np.all(np.isfinite(d)):
        return None
    c = gram / d[..., :, None] / d[..., None, :]  # unit diagonal: cond(c) is what CholeskyQR feels
    try:
        lower = np.linalg.cholesky(c)
        inv = np.linalg.inv(lower)
    except np.linalg.LinAlgError:
        return None
    # cond(c) <= ||c||_inf · ||c⁻¹||_inf (both symmetric), c⁻¹ = L⁻ᵀ L⁻¹: a rigorous bound.
    c_inv = inv.swapaxes(-1, -2) @ inv
    bound = np.abs(c).sum(axis=-1).max(axis=-1) * np.abs(c_inv).sum(axis=-1).max(axis=-1)
    if not np.all(bound <= _CHOLESKY_MAX_COND):
        return None
    return lower, d


def cholesky_core(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """R_B R_Aᵀ from Cholesky of the float64 Grams (CholeskyQR), or None where it is not safe.

    Args:
        a: (..., r, in) float64; b: (..., out, r) float64 with the same leading axes.

    Returns:
        The (..., r, r) core, whose singular values equal those of `_qr_core`'s to about
        1e-10 relative (the R factors agree up to the signs of their rows), or None when
        either factor is rank-deficient or ill-conditioned after scaling its columns
        (a stack falls back as a whole).
    """
    if a.shape[-2] != b.shape[-1]:
        raise ValueError(f"rank mismatch: lora_A has r={a.shape[-2]}, lora_B has r={b.shape[-1]}")
    r = a.shape[-2]
    if b.shape[-2] < r or a.shape[-1] < r:
        return None  # r exceeds a side: the Gram is singular, and QR's R is not square
    with np.errstate(over="ignore", invalid="ignore"):  # a NaN, an infinity or an overflow: refused below
        fb = _cholesky_r(b.swapaxes(-1, -2) @ b)  # numpy runs xᵀx as a symmetric rank-k update
        fa = None if fb is None else _cholesky_r(a @ a.swapaxes(-1, -2))
    if fb is None or fa is None:
        return None
    (l_b, d_b), (l_a, d_a) = fb, fa
    # R_B R_Aᵀ = L_Bᵀ diag(d_B) diag(d_A) L_A
    return (l_b.swapaxes(-1, -2) * (d_b * d_a)[..., None, :]) @ l_a


def _qr_core(a: Any, b: Any, xp: Any, keep_q: bool = False) -> tuple[Any, Any, Any]:
    """(Q_B, Q_A, R_B R_Aᵀ) for B = Q_B R_B and Aᵀ = Q_A R_A (thin QR of the last two axes).

    The Q factors are formed only when `keep_q` (they are None otherwise): singular values
    need the r×r core alone, singular vectors need Q_B and Q_A to lift the core's back.
    """
    if a.shape[-2] != b.shape[-1]:
        raise ValueError(f"rank mismatch: lora_A has r={a.shape[-2]}, lora_B has r={b.shape[-1]}")
    a_t = a.swapaxes(-1, -2)
    if keep_q:
        q_b, r_b = xp.linalg.qr(b)  # (..., out, p), (..., p, r) with p = min(out, r)
        q_a, r_a = xp.linalg.qr(a_t)  # (..., in, q), (..., q, r) with q = min(in, r)
    elif xp is np:
        q_b, r_b, q_a, r_a = None, np.linalg.qr(b, mode="r"), None, np.linalg.qr(a_t, mode="r")
    else:
        q_b, r_b, q_a, r_a = None, xp.linalg.qr(b, mode="r")[1], None, xp.linalg.qr(a_t, mode="r")[1]
    return q_b, q_a, r_b @ r_a.swapaxes(-1, -2)


def core_singular_values(lora_A: Any, lora_B: Any, scale: float = 1.0) -> Any:
    """Singular values of `scale · lora_B @ lora_A`, descending, in float64.

    Args:
        lora_A: (..., r, in) array or tensor; leading axes batch modules of equal shape.
        lora_B: (..., out, r) array or tensor with the same leading axes.
        scale: the LoRA scaling s (alpha / r, or alpha / sqrt(r) for rsLoRA).

    Returns:
        (..., min(r, in, out)) float64 values of the same array type as the inputs
        (a torch tensor stays on its device).

    Raises:
        NonFiniteFactors: a numpy factor holds a NaN or an infinity.

    Example:
        >>> A = np.eye(2, 3); B = np.diag([3.0, 1.0])
        >>> core_singular_values(A, B, scale=0.5).tolist()
        [1.5, 0.5]
    """
    xp = _namespace(lora_A)
    a = _upcast(lora_A, xp)
    b = _upcast(lora_B, xp)
    core = cholesky_core(a, b) if xp is np else None
    if core is None:
        # The Cholesky route accepts only Grams whose every diagonal entry (a row's or a
        # column's sum of squares) is finite and positive, which no NaN or infinity passes;
        # so the explicit scan is paid only here, on the rare fallback.
        if xp is np and not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise NonFiniteFactors("lora_A or lora_B holds a NaN or an infinity")
        _, _, core = _qr_core(a, b, xp)  # (..., min(out, r), min(in, r))
    sigma = np.linalg.svd(core, compute_uv=False) if xp is np else xp.linalg.svdvals(core)
    return sigma * abs(float(scale))


def gram_matrices(lora_A: Any, lora_B: Any) -> tuple[Any, Any]:
    """(A Aᵀ, BᵀB): the two r×r Gram matrices of a factor pair, on the factors' device.

    On a CPU the products run in float32 (several times faster than Householder QR there) and
    elsewhere in float64 (never TF32). Leading axes batch modules of equal shape.
    """
    if lora_A.shape[-2] != lora_B.shape[-1]:
        raise ValueError(f"rank mismatch: lora_A has r={lora_A.shape[-2]}, lora_B has r={lora_B.shape[-1]}")
    xp = _namespace(lora_A)
    if xp is np:
        a, b = np.asarray(lora_A, dtype=np.float64), np.asarray(lora_B, dtype=np.float64)
    else:
        wide = xp.float32 if lora_A.device.type == "cpu" else xp.float64
        a, b = lora_A.to(wide), lora_B.to(wide)
    return a @ a.swapaxes(-1, -2), b.swapaxes(-1, -2) @ b


def singular_values_from_grams(g_a: np.ndarray, g_b: np.ndarray, k: int, scale: float = 1.0) -> np.ndarray:
    """The k largest singular values of s·B·A from its Gram matrices, descending, float64.

    σ(B·A)² are the eigenvalues of Sᵀ·(A Aᵀ)·S for any S with S Sᵀ = BᵀB: the Cholesky
    factor where BᵀB is positive definite, else the symmetric root (BᵀB)^½.
    The price of the Gram route is absolute precision: each σ² is exact to about
    eps · ‖B‖²‖A‖², so a singular value is known only to about √eps · σ_max (~3e-4 · σ_max
    from float32 products, ~1e-8 from float64), while every structural metric (norms,
    stable rank, energy ranks: sums of σ²) keeps ~6 significant digits. The audit, which
    must resolve tiny singular values, uses `core_singular_values`.
    """
    g_a, g_b = np.asarray(g_a, dtype=np.float64), np.asarray(g_b, dtype=np.float64)
    try:
        # Any factor with RᵀR = BᵀB serves as S: Cholesky's L (BᵀB = L Lᵀ) gives Lᵀ(AAᵀ)L,
        # one symmetric eigen-solve instead of two, with the same absolute precision.
        lower = np.linalg.cholesky(g_b)
        core = lower.swapaxes(-1, -2) @ g_a @ lower
    except np.linalg.LinAlgError:  # a singular BᵀB (B = 0 at the start of training, dead columns)
        lam, vec = np.linalg.eigh(g_b)
        root = (vec * np.sqrt(lam.clip(min=0.0))[..., None, :]) @ vec.swapaxes(-1, -2)
        core = root @ g_a @ root
    sq = np.linalg.eigvalsh(core).clip(min=0.0)  # ascending
    return np.sqrt(sq[..., ::-1][..., :k]) * abs(float(scale))


def gram_singular_values(lora_A: Any, lora_B: Any, scale: float = 1.0) -> np.ndarray:
    """The structural snapshot's fast route to the singular values of `scale · lora_B @ lora_A`.

    Same arguments as `core_singular_values`; returns a numpy array (the r×r Gram matrices
    are the only data that leave the factors' device). See `singular_values_from_grams`
    for its precision.

    Example:
        >>> A = np.eye(2, 3); B = np.diag([3.0, 1.0])
        >>> np.round(gram_singular_values(A, B, scale=0.5), 12).tolist()
        [1.5, 0.5]
    """
    g_a, g_b = gram_matrices(lora_A, lora_B)
    if _namespace(g_a) is not np:
        g_a, g_b = g_a.double().cpu().numpy(), g_b.double().cpu().numpy()
    k = min(lora_A.shape[-2], lora_A.shape[-1], lora_B.shape[-2])
    return singular_values_from_grams(g_a, g_b, k, scale)


def core_svd(
    lora_A: Any, lora_B: Any, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of `scale · lora_B @ lora_A` from the same QR core, in float64 numpy.

    With B = Q_B R_B, Aᵀ = Q_A R_A and R_B R_Aᵀ = U_c Σ V_cᵀ, the update is
    (Q_B U_c) · (|scale| Σ) · (Q_A V_c)ᵀ; a negative scale is folded into U. The out×in
    matrix is never formed. Singular values are the ones `core_singular_values` returns.

    Args:
        lora_A: (..., r, in) array (bf16/fp16 are upcast first).
        lora_B: (..., out, r) array with the same leading axes.
        scale: the LoRA scaling s.

    Returns:
        (U, sigma, Vt): U (..., out, k), sigma (..., k) descending, Vt (..., k, in), with
        k = min(out, in, r) columns: the rank-r update needs no more.

    Example:
        >>> U, s, Vt = core_svd(np.eye(2, 3), np.diag([3.0, 1.0]), scale=0.5)
        >>> s.tolist(), np.allclose((U * s) @ Vt, 0.5 * np.diag([3.0, 1.0]) @ np.eye(2, 3))
        ([1.5, 0.5], True)
    """
    a = np.asarray(lora_A, dtype=np.float64)
    b = np.asarray(lora_B, dtype=np.float64)
    q_b, q_a, core = _qr_core(a, b, np, keep_q=True)
    u_c, sigma, vt_c = np.linalg.svd(core, full_matrices=False)
    u = q_b @ u_c
    vt = vt_c @ q_a.swapaxes(-1, -2)
    if scale < 0:
        u = -u
    return u, sigma * abs(float(scale)), vt


def energy_rank(sigma: np.ndarray, fraction: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold `fraction` of the energy Σσ².

    Returns 0 for an all-zero spectrum.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    energy = np.cumsum(np.square(np.asarray(sigma, dtype=np.float64)))
    if energy.size == 0 or energy[-1] <= 0.0:
        return 0
    target = fraction * energy[-1] * (1.0 - _ENERGY_RTOL)
    return int(np.searchsorted(energy, target, side="left")) + 1


def effective_rank(sigma: np.ndarray) -> float:
    """exp of the entropy of pᵢ = σᵢ / Σσ (Roy and Vetterli); 0 for an all-zero spectrum."""
    s = np.asarray(sigma, dtype=np.float64).ravel()
    total = float(np.sum(s))
    if total <= 0.0:
        return 0.0
    p = s / total
    p = p[p > 0.0]  # a denormal σ can underflow to p = 0, whose term is 0 (not 0 · log 0)
    return math.exp(float(-np.sum(p * np.log(p))))


@dataclass(frozen=True)
class SpectrumMetrics:
    """The metrics of DESIGN.md for one update, all derived from one singular-value vector."""

    rank: int
    frobenius_norm: float
    sigma_max: float
    stable_rank: float
    utilization: float
    energy_rank_90: int
    energy_rank: int
    energy_fraction: float
    effective_rank: float
    numerical_rank: int
    is_zero: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spectrum_metrics(
    sigma: np.ndarray,
    rank: int,
    shape: tuple[int, int],
    energy_fraction: float = 0.9,
) -> SpectrumMetrics:
    """Every structural metric of one update from its singular values.

    Args:
        sigma: singular values (any order; negative or non-finite values are a caller bug).
        rank: the allocated LoRA rank r (denominator of utilization).
        shape: (out, in) of the update, for the numerical-rank tolerance.
        energy_fraction: the fraction for `energy_rank` (`energy_rank_90` is always at 0.90).

    Returns:
        SpectrumMetrics. An all-zero update has stable, energy, effective and numerical
        rank 0 and `is_zero=True`, so callers can flag it rather than divide by zero.
    """
    s = np.sort(np.asarray(sigma, dtype=np.float64).ravel())[::-1]
    if rank <= 0:
        raise ValueError(f"allocated rank must be positive, got {rank}")
    total = float(np.sum(np.square(s)))
    smax = float(s[0]) if s.size else 0.0
    if total <= 0.0 or smax <= 0.0:
        return SpectrumMetrics(rank, 0.0, 0.0, 0.0, 0.0, 0, 0, energy_fraction, 0.0, 0, True)
    stable = total / (smax * smax)
    tol = smax * max(shape) * FLOAT32_EPS
    return SpectrumMetrics(
        rank=rank,
        frobenius_norm=math.sqrt(total),
        sigma_max=smax,
        stable_rank=stable,
        utilization=stable / rank,
        energy_rank_90=energy_rank(s, 0.9),
        energy_rank=energy_rank(s, energy_fraction),
        energy_fraction=energy_fraction,
        effective_rank=effective_rank(s),
        numerical_rank=int(np.count_nonzero(s > tol)),
        is_zero=False,
    )
