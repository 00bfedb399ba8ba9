"""Two LoRA adapters side by side: subspace overlap, agreement, dominance; and merging them.

`compare(a, b)` matches modules by path. For each shared module it reports the overlap of
the top-k left and right singular subspaces (mean cosine of the principal angles, DESIGN.md),
the cosine between the two updates as vectors and their norm ratio; for the whole pair the
merge dominance D = |S_A − S_B| / (S_A + S_B) and a verdict. Beside each overlap stands what
chance gives: for independent uniformly random k-dimensional subspaces of R^n the principal
angles satisfy E[Σ cos²θᵢ] = tr(E[P₁]E[P₂]) = tr((k/n)I · (k/n)I) = k²/n exactly, so the
mean cos² is k/n on average; the report gives the measured mean cos² next to k/n. Nothing forms an out×in matrix:
inner products use the trace identity ⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂ · tr((B₂ᵀB₁)(A₁A₂ᵀ)).

Writing a merged adapter is `gradience.mechanic.merge`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.lora.reader import Adapter, LoraModule, ModuleProblem
from gradience.spectrum import core_singular_values, core_svd, energy_rank

# Verdict thresholds (stated in every report).
THRESHOLDS = {"dominance_max": 0.5, "overlap_high": 0.5, "overlap_low": 0.2,
              "agreement_min": 0.1, "conflict_max": -0.1}


@dataclass(frozen=True)
class ModuleComparison:
    """One shared module; overlaps and agreement are None where undefined (a zero update)."""

    name: str
    shape: tuple[int, int]
    r_a: int
    r_b: int
    k: int
    status: str  # "ok", "zero", "nonfinite" or "shape_mismatch"
    overlap_left: float | None = None  # mean cos of principal angles, top-k left subspaces
    overlap_right: float | None = None
    agreement: float | None = None  # ⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F ‖ΔW₂‖_F)
    magnitude_ratio: float | None = None  # ‖ΔW₁‖_F / ‖ΔW₂‖_F
    frobenius_norm_a: float = 0.0
    frobenius_norm_b: float = 0.0
    overlap_left_sq: float | None = None  # mean cos² of the same principal angles
    overlap_right_sq: float | None = None
    random_overlap_left_sq: float | None = None  # k / out: E[mean cos²] for random subspaces
    random_overlap_right_sq: float | None = None  # k / in


@dataclass(frozen=True)
class CompareReport:
    """What `gradience compare` prints; `to_dict()` is exactly what `--json` prints."""

    a_dir: str
    b_dir: str
    n_shared: int
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    frobenius_norm_a: float  # S_A: the whole adapter's update norm
    frobenius_norm_b: float
    dominance: float  # D = |S_A − S_B| / (S_A + S_B)
    agreement: float | None  # cosine of the whole adapters' updates (unshared modules count 0)
    magnitude_ratio: float | None  # S_A / S_B
    overlap_left_mean: float | None
    overlap_right_mean: float | None
    overlap_left_sq_mean: float | None  # measured mean cos², beside ...
    random_overlap_left_sq_mean: float | None  # ... its expectation for random subspaces (k/n)
    overlap_right_sq_mean: float | None
    random_overlap_right_sq_mean: float | None
    verdict: str
    verdict_reason: str
    thresholds: dict[str, float]
    warnings: tuple[str, ...]
    modules: tuple[ModuleComparison, ...]
    problems: tuple[dict[str, str], ...] = ()  # unreadable modules: the CLI exits 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_modules(
    peft_dir: str | Path, strict: bool
) -> tuple[Adapter, dict[str, LoraModule], list[str], list[dict[str, str]]]:
    """Open an adapter and read its modules by path.

    With `strict`, an unreadable or non-finite module or a DoRA adapter is an error (merge);
    otherwise each is skipped, noted in the returned warnings and listed as a problem (compare).
    """
    adapter = Adapter.open(peft_dir)
    mods: dict[str, LoraModule] = {}
    notes: list[str] = []
    skipped: list[dict[str, str]] = []
    for item in adapter.modules():
        if isinstance(item, ModuleProblem):
            if strict:
                raise AdapterError(f"{peft_dir}: module {item.name} cannot be read ({item.message})")
            notes.append(f"{peft_dir}: module {item.name} skipped ({item.message})")
            skipped.append({"adapter": str(peft_dir), "module": item.name, "problem": item.message})
        elif strict and not (np.isfinite(item.lora_A).all() and np.isfinite(item.lora_B).all()):
            raise AdapterError(f"{peft_dir}: module {item.name} holds NaN/Inf weights")
        else:
            mods[item.name] = item
    if adapter.is_dora:
        if strict:
            raise UnsupportedAdapterError(f"{peft_dir}: DoRA adapter; merge supports plain LoRA and rsLoRA only")
        notes.append(f"{peft_dir}: DoRA adapter; only its B·A part is compared")
    return adapter, mods, notes, skipped


def _inner(m1: LoraModule, m2: LoraModule) -> float:
    """⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂ · tr((B₂ᵀB₁)(A₁A₂ᵀ)), in float64."""
    a1, b1 = np.asarray(m1.lora_A, np.float64), np.asarray(m1.lora_B, np.float64)
    a2, b2 = np.asarray(m2.lora_A, np.float64), np.asarray(m2.lora_B, np.float64)
    return m1.scale * m2.scale * float(np.einsum("ij,ji->", b2.T @ b1, a1 @ a2.T))


def _overlap(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cos and mean cos² of the principal angles between the column spans of orthonormal x and y."""
    cos = np.clip(np.linalg.svd(x.T @ y, compute_uv=False), 0.0, 1.0)
    return float(np.mean(cos)), float(np.mean(np.square(cos)))


def random_overlap_sq(k: int, n: int) -> float:
    """E[mean cos²θ] over the k principal angles of two independent uniform random k-subspaces of R^n: k/n.

    Exact: E[P] = (k/n)·I for a uniform random rank-k projector, so E[Σ cos²θᵢ] =
    E[tr(P₁P₂)] = tr(E[P₁]E[P₂]) = k²/n.

    Example:
        >>> random_overlap_sq(4, 64)
        0.0625
    """
    return k / n


def _finite(m: LoraModule) -> bool:
    return bool(np.isfinite(m.lora_A).all() and np.isfinite(m.lora_B).all())


def compare_module(m1: LoraModule, m2: LoraModule, k: int | None = None) -> tuple[ModuleComparison, float]:
    """Compare one module of two adapters; returns the row and ⟨ΔW₁, ΔW₂⟩_F (0 if undefined)."""
    base = dict(name=m1.name, shape=m1.shape, r_a=m1.r, r_b=m2.r)
    if m1.shape != m2.shape:
        return ModuleComparison(k=0, status="shape_mismatch", **base), 0.0  # type: ignore[arg-type]
    if not (_finite(m1) and _finite(m2)):
        return ModuleComparison(k=0, status="nonfinite", **base), 0.0  # type: ignore[arg-type]
    u1, s1, vt1 = core_svd(m1.lora_A, m1.lora_B, m1.scale)
    u2, s2, vt2 = core_svd(m2.lora_A, m2.lora_B, m2.scale)
    n1, n2 = float(np.linalg.norm(s1)), float(np.linalg.norm(s2))
    norms = dict(frobenius_norm_a=n1, frobenius_norm_b=n2, magnitude_ratio=n1 / n2 if n2 > 0 else None)
    if n1 == 0.0 or n2 == 0.0:
        return ModuleComparison(k=0, status="zero", **base, **norms), 0.0  # type: ignore[arg-type]
    kk = k if k is not None else max(1, min(energy_rank(s1, 0.9), energy_rank(s2, 0.9)))
    kk = min(kk, s1.size, s2.size)
    inner = _inner(m1, m2)
    (left, left_sq), (right, right_sq) = _overlap(u1[:, :kk], u2[:, :kk]), _overlap(vt1[:kk].T, vt2[:kk].T)
    row = ModuleComparison(
        k=kk, status="ok", overlap_left=left, overlap_right=right,
        agreement=max(-1.0, min(1.0, inner / (n1 * n2))), **base, **norms,  # type: ignore[arg-type]
        overlap_left_sq=left_sq, overlap_right_sq=right_sq,
        random_overlap_left_sq=random_overlap_sq(kk, m1.shape[0]), random_overlap_right_sq=random_overlap_sq(kk, m1.shape[1]),
    )
    return row, inner


def compare(a_dir: str | Path, b_dir: str | Path, k: int | None = None) -> CompareReport:
    """Compare two PEFT LoRA adapters module by module.

    Args:
        a_dir, b_dir: adapter folders.
        k: subspace size for the overlaps; default per module min of the two energy ranks
            at 0.9 (at least 1), capped by the ranks available.

    Returns:
        CompareReport with per-module overlaps, agreement, norms, dominance and a verdict.

    Raises:
        UsageError: missing folders or k < 1. AdapterError: unreadable adapters.

    Example:
        >>> compare("runs/a/peft", "runs/b/peft").verdict  # doctest: +SKIP
        'compatible'
    """
    if k is not None and k < 1:
        raise UsageError(f"--k must be a positive integer, got {k}")
    ad_a, mods_a, notes_a, problems_a = load_modules(a_dir, strict=False)
    ad_b, mods_b, notes_b, problems_b = load_modules(b_dir, strict=False)
    warnings = notes_a + notes_b
    for tag, ad in (("A", ad_a), ("B", ad_b)):
        warnings += [f"adapter {tag}: {w}" for w in (ad.init_warning(), *ad.pattern_overlaps()) if w]
    rows, inner = [], 0.0
    for name, m1 in mods_a.items():
        if name in mods_b:
            row, ip = compare_module(m1, mods_b[name], k)
            rows.append(row)
            inner += ip
            if row.status in ("shape_mismatch", "nonfinite"):
                warnings.append(f"module {name}: {row.status.replace('_', ' ')}; left out")
    s_a, s_b = _total_norm(mods_a.values()), _total_norm(mods_b.values())
    ok = [r for r in rows if r.status == "ok"]
    left = float(np.mean([r.overlap_left for r in ok])) if ok else None
    right = float(np.mean([r.overlap_right for r in ok])) if ok else None

    def mean_of(field: str) -> float | None:
        return float(np.mean([getattr(r, field) for r in ok])) if ok else None

    agreement = max(-1.0, min(1.0, inner / (s_a * s_b))) if s_a > 0 and s_b > 0 else None
    dominance = abs(s_a - s_b) / (s_a + s_b) if s_a + s_b > 0 else 0.0
    verdict, reason = _verdict(len(rows), s_a, s_b, dominance, agreement, left, right)
    return CompareReport(
        a_dir=str(a_dir), b_dir=str(b_dir), n_shared=len(rows),
        only_a=tuple(n for n in mods_a if n not in mods_b), only_b=tuple(n for n in mods_b if n not in mods_a),
        frobenius_norm_a=s_a, frobenius_norm_b=s_b, dominance=dominance, agreement=agreement,
        magnitude_ratio=s_a / s_b if s_b > 0 else None, overlap_left_mean=left, overlap_right_mean=right,
        overlap_left_sq_mean=mean_of("overlap_left_sq"), random_overlap_left_sq_mean=mean_of("random_overlap_left_sq"),
        overlap_right_sq_mean=mean_of("overlap_right_sq"),
        random_overlap_right_sq_mean=mean_of("random_overlap_right_sq"),
        verdict=verdict, verdict_reason=reason, thresholds=dict(THRESHOLDS), warnings=tuple(warnings),
        modules=tuple(rows), problems=tuple(problems_a + problems_b),
    )


def _total_norm(mods: Any) -> float:
    return math.sqrt(sum(
        float(np.sum(np.square(core_singular_values(m.lora_A, m.lora_B, m.scale))))
        for m in mods if _finite(m)
    ))


def _verdict(
    n_shared: int, s_a: float, s_b: float, dominance: float, agreement: float | None,
    left: float | None, right: float | None,
) -> tuple[str, str]:
    """First rule that applies: disjoint, dominated, conflicting, compatible, independent, mixed."""
    t = THRESHOLDS
    if n_shared == 0 or left is None or right is None or agreement is None:
        return "disjoint", "no shared module with a nonzero update in both: a merge is the union of the two"
    if dominance > t["dominance_max"]:
        big = "A" if s_a > s_b else "B"
        return "dominated", (f"D = {dominance:.2f} > {t['dominance_max']}: adapter {big} would dominate a "
                             "merge; rebalance with the merge weights")
    overlap = 0.5 * (left + right)
    if agreement <= t["conflict_max"]:
        return "conflicting", (f"agreement {agreement:.2f} <= {t['conflict_max']}: the updates point in "
                               "opposite directions and would cancel in a linear merge")
    if overlap >= t["overlap_high"] and agreement >= t["agreement_min"]:
        return "compatible", (f"overlap {overlap:.2f} >= {t['overlap_high']} and agreement {agreement:.2f} >= "
                              f"{t['agreement_min']}: compatible for a linear merge")
    if overlap < t["overlap_low"]:
        return "independent", (f"overlap {overlap:.2f} < {t['overlap_low']}: the adapters use different "
                               "subspaces, so a linear merge keeps both with little interference")
    return "mixed", (f"overlap {overlap:.2f} with agreement {agreement:.2f}: partial interference; "
                     "prefer a ties or svd merge and check it with an eval")
