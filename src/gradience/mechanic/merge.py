"""Merging two LoRA adapters into one PEFT adapter for w₁ΔW₁ + w₂ΔW₂, on low-rank factors.

`merge(a, b, out_dir, weights, method)` matches modules by path (a module in one adapter only
counts 0 in the other) and writes through `gradience.lora.writer`; see its docstring for
what each method (`linear`, `svd`, `ties`, `dare`) does. Nothing out×in is formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import AdapterError, UsageError
from gradience.lora.reader import Adapter, LoraModule
from gradience.lora.writer import (
    bias_key,
    exact_pattern_keys,
    factored_distance,
    from_stored,
    global_rank,
    lora_scale,
    module_keys,
    prepare_out_dir,
    rescale_bias,
    save_adapter,
    split_factors,
    to_stored,
)
from gradience.mechanic.compare import load_modules
from gradience.spectrum import FLOAT32_EPS, core_singular_values, core_svd

METHODS = ("linear", "svd", "ties", "dare")


@dataclass(frozen=True)
class _Part:
    """One adapter's share of a merged module."""

    tag: str  # "a" or "b"
    weight: float
    module: LoraModule
    adapter: Adapter
    keys: tuple[str, str]  # stored lora_A / lora_B keys


@dataclass(frozen=True)
class ModuleMerge:
    name: str
    source: str  # "both", "a" or "b"
    shape: tuple[int, int]
    r_a: int
    r_b: int
    r: int
    relative_error: float  # ‖written − (w₁ΔW₁ + w₂ΔW₂)‖_F / ‖w₁ΔW₁ + w₂ΔW₂‖_F


@dataclass(frozen=True)
class MergeReport:
    """What `gradience merge` prints; `to_dict()` is exactly what `--json` prints."""

    a_dir: str
    b_dir: str
    out_dir: str
    method: str
    weights: tuple[float, float]
    density: float
    seed: int
    rank: int | None
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_params: int
    relative_error: float  # whole adapter, against the exact weighted sum
    warnings: tuple[str, ...]
    modules: tuple[ModuleMerge, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(
    a_dir: str | Path,
    b_dir: str | Path,
    out_dir: str | Path,
    weights: Sequence[float] = (1.0, 1.0),
    method: str = "linear",
    rank: int | None = None,
    seed: int = 0,
    *,
    density: float = 0.5,
    force: bool = False,
) -> MergeReport:
    """Write a PEFT adapter approximating w₁ΔW₁ + w₂ΔW₂ (a module in one adapter only counts 0 in the other).

    Methods, all on low-rank factors (nothing out×in is formed):

    - `linear`: exact. Concatenates the factors, A = [A₁; A₂] and B = [w₁s₁B₁ | w₂s₂B₂] at
      rank r₁ + r₂, with each block rescaled so PEFT's new scale reproduces it.
    - `svd`: the exact sum re-factored through the QR core of the concatenated factors and
      truncated to rank K (`rank`, default max(r₁, r₂)); the error is the spectrum's tail.
    - `dare`: DARE on the adapters' own parameters, i.e. the factor entries: every entry of
      A₁, B₁, A₂, B₂ is kept with probability `density` (independent masks, `seed`) and
      divided by it, then the factors are concatenated as in `linear`. The masks on A and B
      are independent, so E[B′A′] = BA: unbiased, but it is not DARE on the entries of ΔW,
      and its variance is larger (a product of two masks). With `rank`, the masked
      concatenation is then re-factored as in `svd`.
    - `ties`: TIES in a shared basis. Sign election needs coordinates that mean the same in
      both adapters, which factor entries do not (rank components are unordered), so both
      updates are written in the singular bases U, V of their unweighted sum (from
      `core_svd`): Cᵢ = Uᵀ ΔWᵢ V, exact when out, in ≥ r₁ + r₂. On the Cᵢ: keep the top
      `density` fraction of entries by magnitude in each, elect each entry's sign as the
      sign of their sum, and take the mean of wᵢCᵢ over the entries that agree with it
      (PEFT's `ties` rules). The result is re-factored at rank K (`rank`, default its
      numerical rank).
      This is TIES on spectral coordinates, not on the entries of ΔW.

    Args:
        a_dir, b_dir: adapter folders; the output takes A's config (alpha, rsLoRA, ...).
        out_dir: where to write the merged adapter.
        weights: (w₁, w₂).
        method: one of `METHODS`. rank: output rank for svd / ties / dare (not linear).
        seed: DARE's random masks. density: kept fraction for ties and dare, in (0, 1].
        force: overwrite an adapter already in `out_dir`.

    Returns:
        MergeReport with each module's rank and relative Frobenius error against the exact
        weighted sum, of the factors as written (in their dtype). The error norm is that of
        the factored difference [B′ | −B]·[A′; A] through the QR core: no out×in, and unlike
        ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ from the trace identity, no cancellation near zero error.

    Raises:
        UsageError: bad arguments or out_dir. AdapterError: unreadable adapters or modules
        whose shapes differ. UnsupportedAdapterError: DoRA.

    Example:
        >>> merge("a/peft", "b/peft", "ab", weights=(0.5, 0.5)).relative_error  # doctest: +SKIP
        1.2e-08
    """
    w = _check_merge_args(weights, method, rank, density)
    out = prepare_out_dir(out_dir, [a_dir, b_dir], force)
    ad_a, mods_a, *_ = load_modules(a_dir, strict=True)
    ad_b, mods_b, *_ = load_modules(b_dir, strict=True)
    st = ad_a.settings
    keys = {"a": module_keys(ad_a), "b": module_keys(ad_b)}
    rng = np.random.default_rng(seed)
    names = list(mods_a) + [n for n in mods_b if n not in mods_a]
    with_bias = any(m.lora_bias is not None for mods in (mods_a, mods_b) for m in mods.values())
    tensors: dict[str, np.ndarray] = {}
    rows, err2, total2 = [], 0.0, 0.0
    for name in names:
        parts = [_Part(tag, wi, mods[name], ad, keys[tag][name]) for tag, wi, mods, ad in
                 (("a", w[0], mods_a, ad_a), ("b", w[1], mods_b, ad_b)) if name in mods]
        row, d2, n2 = _merge_one(parts, method, rank, density, rng, st.lora_alpha, st.use_rslora, tensors, with_bias)
        rows.append(row)
        err2, total2 = err2 + d2, total2 + n2
    tensors.update(_other_tensors(ad_a, ad_b))
    config, warnings = _merged_config(ad_a, ad_b, names, {m.name: m.r for m in rows}, set(mods_a))
    if with_bias:
        config["lora_bias"] = True
    warnings += _weight_notes(w, ad_a, ad_b)
    save_adapter(out, config, tensors)
    return MergeReport(
        a_dir=str(a_dir), b_dir=str(b_dir), out_dir=str(out), method=method, weights=(w[0], w[1]),
        density=density, seed=seed, rank=rank, r=int(config["r"]), lora_alpha=st.lora_alpha,
        use_rslora=st.use_rslora, lora_params=sum(m.r * (m.shape[0] + m.shape[1]) for m in rows),
        relative_error=math.sqrt(err2 / total2) if total2 > 0 else 0.0,
        warnings=tuple(warnings), modules=tuple(rows),
    )


def _merge_one(
    parts: list[_Part], method: str, rank: int | None, density: float, rng: np.random.Generator,
    alpha: float, rslora: bool, tensors: dict[str, np.ndarray], with_bias: bool = False,
) -> tuple[ModuleMerge, float, float]:
    """Merge one module into `tensors`; returns its row, ‖written − exact‖² and ‖exact‖².

    With `lora_bias`, the written bias is Σ wᵢsᵢbᵢ / s (PEFT adds s · b) and (ΔW, bias)
    count as one vector in both norms.
    """
    mods = [p.module for p in parts]
    name, kind = mods[0].name, mods[0].kind
    if len(mods) == 2 and (mods[0].shape != mods[1].shape or mods[0].kind != mods[1].kind):
        raise AdapterError(
            f"module {name}: {kind} {list(mods[0].shape)} in A but {mods[1].kind} "
            f"{list(mods[1].shape)} in B (adapters for different base models?)"
        )
    a, b, r, scale = _merge_module(parts, method, rank, density, rng, alpha, rslora)
    stored = [(p.adapter.file.read(p.keys[0]), p.adapter.file.read(p.keys[1])) for p in parts]
    # the stored dtype where both agree (bf16 stays bf16), else float32
    dtypes = [stored[0][i].dtype if all(x[i].dtype == stored[0][i].dtype for x in stored) else np.float32 for i in (0, 1)]
    key_a, key_b = parts[0].keys
    tensors[key_a], tensors[key_b] = to_stored(kind, a, b, stored[0][0].shape, stored[0][1].shape, *dtypes)
    # the error of what was written, against the exact weighted sum, through the QR core
    exact_a = np.concatenate([np.asarray(m.lora_A, np.float64) for m in mods])
    exact_b = np.concatenate([p.weight * p.module.scale * np.asarray(p.module.lora_B, np.float64) for p in parts], axis=1)
    wa, wb = from_stored(kind, tensors[key_a], tensors[key_b])
    d2 = factored_distance(wa, scale * wb, exact_a, exact_b) ** 2
    n2 = float(np.sum(np.square(core_singular_values(exact_a, exact_b))))
    if with_bias and kind != "embedding":
        exact_bias = sum(
            (p.weight * p.module.scale * np.asarray(p.module.lora_bias, np.float64) for p in parts
             if p.module.lora_bias is not None), np.zeros(mods[0].shape[0]),
        )
        dtype = next((p.module.lora_bias.dtype for p in parts if p.module.lora_bias is not None), dtypes[1])
        d2 += rescale_bias(exact_bias.astype(np.float64), 1.0, scale, bias_key(key_b), tensors)
        tensors[bias_key(key_b)] = tensors[bias_key(key_b)].astype(dtype)
        n2 += float(np.sum(np.square(exact_bias)))
    ranks = {p.tag: p.module.r for p in parts}
    row = ModuleMerge(
        name=name, source="both" if len(parts) == 2 else parts[0].tag, shape=mods[0].shape,
        r_a=ranks.get("a", 0), r_b=ranks.get("b", 0), r=r,
        relative_error=math.sqrt(d2 / n2) if n2 > 0 else 0.0,
    )
    return row, d2, n2


def _check_merge_args(weights: Sequence[float], method: str, rank: int | None, density: float) -> tuple[float, float]:
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    w = tuple(float(x) for x in weights)
    if len(w) != 2 or not all(math.isfinite(x) for x in w):
        raise UsageError(f"--weights takes two finite numbers, got {list(weights)}")
    if rank is not None and (rank < 1 or method == "linear"):
        raise UsageError("--rank must be a positive integer, for --method svd, ties or dare "
                         "(linear is exact at rank r1 + r2)")
    if not 0.0 < density <= 1.0:
        raise UsageError(f"--density must be in (0, 1], got {density}")
    return w[0], w[1]


def _merge_module(
    parts: list[_Part], method: str, rank: int | None, density: float, rng: np.random.Generator,
    alpha: float, rslora: bool,
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(A, B, r, s) in module orientation with s · B · A the merged update, s = PEFT's scale at r."""
    if alpha == 0:
        raise UsageError("lora_alpha of adapter A is 0: the merged update could not be scaled")
    blocks = []  # (A_i, B_i, c_i) with the update Σ c_i B_i A_i
    for p in parts:
        a, b = np.asarray(p.module.lora_A, np.float64), np.asarray(p.module.lora_B, np.float64)
        if method == "dare":
            a = a * (rng.random(a.shape) < density) / density
            b = b * (rng.random(b.shape) < density) / density
        blocks.append((a, b, p.weight * p.module.scale))
    if method in ("linear", "dare") and rank is None:
        r = sum(a.shape[0] for a, _, _ in blocks)
        s = lora_scale(alpha, r, rslora)
        roots = [math.sqrt(abs(c / s)) for _, _, c in blocks]
        a_new = np.concatenate([rt * a for (a, _, _), rt in zip(blocks, roots, strict=True)])
        b_new = np.concatenate([math.copysign(rt, c / s) * b for (_, b, c), rt in zip(blocks, roots, strict=True)], axis=1)
        return a_new, b_new, r, s
    if method == "ties":
        unweighted = [(a, b, p.module.scale) for (a, b, _), p in zip(blocks, parts, strict=True)]
        u, sigma, vt = _ties(unweighted, [p.weight for p in parts], density)
        shape = parts[0].module.shape
        k = rank or int(np.count_nonzero(sigma > sigma[0] * max(shape) * FLOAT32_EPS))
    else:
        a_cat = np.concatenate([a for a, _, _ in blocks])
        b_cat = np.concatenate([c * b for _, b, c in blocks], axis=1)
        u, sigma, vt = core_svd(a_cat, b_cat)
        k = rank or max(p.module.r for p in parts)
    k = max(1, min(k, sigma.size))
    s = lora_scale(alpha, k, rslora)
    a_new, b_new = split_factors(u[:, :k], sigma[:k], vt[:k], s)
    return a_new, b_new, k, s


def _ties(
    unweighted: list[Any], weights: list[float], density: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TIES on the coordinates Cᵢ = Uᵀ(sᵢBᵢAᵢ)V in the singular bases of the unweighted sum."""
    u, _, vt = core_svd(np.concatenate([a for a, _, _ in unweighted]),
                        np.concatenate([s * b for _, b, s in unweighted], axis=1))
    coords = np.stack([(u.T @ (s * b)) @ (a @ vt.T) for a, b, s in unweighted])  # (n, k, k)
    keep = max(1, int(density * coords[0].size))
    trimmed = np.zeros_like(coords)
    for i, c in enumerate(coords):
        top = np.argsort(-np.abs(c), axis=None, kind="stable")[:keep]
        trimmed[i].flat[top] = c.flat[top]
    elected = np.where(trimmed.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == elected
    weighted = trimmed * np.asarray(weights)[:, None, None]
    merged = (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
    uc, sigma, vct = np.linalg.svd(merged)
    return u @ uc, sigma, vct @ vt


def _other_tensors(ad_a: Adapter, ad_b: Adapter) -> dict[str, np.ndarray]:
    """Non-LoRA tensors of both (modules_to_save copies, lora bias); a name in both must agree."""
    out = {n: ad_a.file.read(n) for n in ad_a.other_tensors}
    for n in ad_b.other_tensors:
        t = ad_b.file.read(n)
        if n in out and not (out[n].shape == t.shape and np.array_equal(out[n], t)):
            raise UsageError(
                f"{ad_b.weights_path}: tensor {n} differs from A's (modules_to_save?); "
                "merge combines LoRA updates only, not full weights"
            )
        out[n] = t
    return out


def _merged_config(
    ad_a: Adapter, ad_b: Adapter, names: list[str], ranks: dict[str, int], in_a: set[str]
) -> tuple[dict[str, Any], list[str]]:
    """A's config with the merged ranks; every module at A's lora_alpha (no alpha_pattern)."""
    sa, sb = ad_a.settings, ad_b.settings
    r = global_rank(ranks)
    config = dict(sa.raw)
    config.update(
        r=r, rank_pattern=exact_pattern_keys({n: k for n, k in ranks.items() if k != r}, names),
        alpha_pattern={}, use_dora=False,
    )
    warnings = []
    if set(names) != in_a:  # B adds modules: target exactly the merged ones
        config.update(target_modules=sorted(names), layers_to_transform=None, layers_pattern=None,
                      exclude_modules=None)
    extra = [m for m in (sb.raw.get("modules_to_save") or []) if m not in (sa.raw.get("modules_to_save") or [])]
    if extra:
        config["modules_to_save"] = [*(sa.raw.get("modules_to_save") or []), *extra]
    if sa.base_model_name_or_path != sb.base_model_name_or_path:
        warnings.append(f"base models differ: {sa.base_model_name_or_path} (A) vs {sb.base_model_name_or_path} (B)")
    if sa.use_rslora != sb.use_rslora:
        warnings.append("rsLoRA differs between the adapters: the output uses A's setting (scales are folded in)")
    return config, warnings


def _weight_notes(w: tuple[float, float], ad_a: Adapter, ad_b: Adapter) -> list[str]:
    """What the weights mean, and inputs whose update B·A may not be (PiSSA-style init)."""
    out = []
    if w[0] + w[1] > 1.0 + 1e-12:
        out.append(f"weights sum to {w[0] + w[1]:g} > 1: the merged update is the weighted sum, not the average")
    if min(w) < 0:
        out.append("a negative weight subtracts that adapter's update (its sign is kept)")
    mts_a, mts_b = ad_a.settings.raw.get("modules_to_save") or [], ad_b.settings.raw.get("modules_to_save") or []
    only = [f"{m} (from {tag} only)" for tag, mine, theirs in (("A", mts_a, mts_b), ("B", mts_b, mts_a))
            for m in mine if m not in theirs]  # fmt: skip
    if only:
        out.append("modules_to_save come from one adapter only and are copied as is, not weighted: " + ", ".join(only))
    for tag, ad in (("A", ad_a), ("B", ad_b)):
        why = ad.init_warning()
        if why:
            out.append(f"adapter {tag}: {why}")
    return out
