"""Truncated-SVD re-factorisation of a LoRA adapter to new per-module ranks.

`compress(peft_dir, out_dir, rank=... | energy=... | policy=... | budget_params=...)`
keeps the top-k singular directions of each update ΔW = s · B · A (Eckart–Young: the best
rank-k approximation in Frobenius and spectral norm) and writes a PEFT adapter that loads
with `PeftModel.from_pretrained`. Errors are closed form from the singular values: with
energy E = Σσ², the relative Frobenius error is √(Σ_{i>k} σᵢ²) / √E and the relative
spectral error σ_{k+1} / σ₁.

Scale: each module keeps its `lora_alpha`, so PEFT applies s' = alpha / k (alpha / √k with
rsLoRA) at the new rank, as if it had been trained at rank k. The new factors absorb s':
A' = diag(√(σ/s')) Vtₖ and B' = Uₖ diag(√(σ/s')), so s' · B' · A' is the truncated update.
Ranks and alphas are written as `rank_pattern` / `alpha_pattern` keyed by full module path.

The written adapter goes through `gradience.lora.writer` (shared with `gradience.mechanic.merge`).
With `verify=eval_fn`, the input and output adapters are both scored by the caller's eval,
so the closed-form errors come with a measured before/after (`CompressReport.verify`).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
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
from gradience.mechanic.audit import AuditReport, ModuleAudit, audit
from gradience.mechanic.policies import POLICIES
from gradience.mechanic.policies import energy as energy_policy
from gradience.spectrum import FLOAT32_EPS, core_svd

AUDIT_POLICIES = ("median", "p90", "per-module")

# The caller's eval: an adapter folder in, named metrics out (e.g. {"accuracy": 0.77, "loss": 0.52}).
EvalFn = Callable[[Path], Mapping[str, float]]


@dataclass(frozen=True)
class ModuleCompression:
    """One module before and after; errors are relative to that module's ‖ΔW‖."""

    name: str
    kind: str
    shape: tuple[int, int]
    r_before: int
    r_after: int
    alpha: float
    scale_before: float
    scale_after: float
    params_before: int
    params_after: int
    retained_energy: float  # Σ_{i≤k} σᵢ² / Σ σᵢ² (1 for a zero update)
    relative_frobenius_error: float  # ‖ΔW − ΔWₖ‖_F / ‖ΔW‖_F
    relative_spectral_error: float  # σ_{k+1} / σ₁


@dataclass(frozen=True)
class Verification:
    """The caller's eval on the input and on the written adapter; delta = after − before.

    Metrics that are not finite numbers are kept as None (and get no delta).
    """

    evaluator: str
    before: dict[str, float | None]
    after: dict[str, float | None]
    delta: dict[str, float | None]


@dataclass(frozen=True)
class CompressReport:
    """What `gradience compress` prints; `to_dict()` is exactly what `--json` prints."""

    peft_dir: str
    out_dir: str
    selector: str  # "rank", "energy", "policy" or "budget_params"
    value: str
    r: int
    lora_alpha: float
    use_rslora: bool
    params_before: int
    params_after: int
    param_reduction: float  # 1 − after / before
    retained_energy: float  # over the whole adapter
    relative_frobenius_error: float  # whole adapter: √(Σ tails) / √(Σ energies)
    relative_spectral_error: float  # worst module
    storage_error: float  # measured: written factors (in their dtype) vs the exact truncation
    warnings: tuple[str, ...]
    modules: tuple[ModuleCompression, ...]
    verify: Verification | None = None  # only with compress(..., verify=eval_fn)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compress(
    peft_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    policy: str | None = None,
    budget_params: int | None = None,
    force: bool = False,
    verify: EvalFn | None = None,
) -> CompressReport:
    """Re-factor every module of a PEFT LoRA adapter to a lower rank and save the result.

    Args:
        peft_dir: the input adapter folder.
        out_dir: where to write adapter_config.json and adapter_model.safetensors.
        rank: keep min(rank, r) directions in every module.
        energy: keep each module's smallest k holding this fraction of Σσ².
        policy: `median` / `p90` (the audit's uniform suggestions), `per-module` (its
            rank_pattern), or a rank policy of `gradience.mechanic.policies.POLICIES`.
        budget_params: keep at most this many LoRA parameters, spent greedily on the rank
            increments with the most energy σ² per parameter (in + out) across modules.
        force: overwrite an adapter already in `out_dir`.
        verify: an eval `fn(adapter_dir) -> {metric: value}`, called on the input before
            anything is written and on the output after; the report's `verify` holds both
            and their difference. `gradience.demo.evaluator.demo_evaluator` builds one for
            demo-task adapters.
        Exactly one of rank, energy, policy and budget_params is given.

    Returns:
        CompressReport with per-module ranks, closed-form errors, parameter counts and,
        with `verify`, the measured metrics before and after.

    Raises:
        UsageError: bad selector, out_dir is the input or holds an adapter (without force),
            or `verify` returned something other than a mapping of metric names.
        AdapterError: an unreadable or non-finite module. UnsupportedAdapterError: DoRA.
        Whatever `verify` raises propagates.

    Example:
        >>> report = compress("runs/toy/peft", "runs/toy/peft-r4", rank=4)  # doctest: +SKIP
        >>> report.param_reduction                                          # doctest: +SKIP
        0.5
    """
    selector, value = _selector(rank, energy, policy, budget_params)
    out = prepare_out_dir(out_dir, [peft_dir], force)
    audited = audit(peft_dir)
    _refuse(audited)
    targets = _target_ranks(audited, selector, value)
    before = _score(verify, Path(peft_dir)) if verify is not None else None
    adapter = Adapter.open(peft_dir)
    keys = module_keys(adapter)
    tensors: dict[str, np.ndarray] = {}
    rows: list[ModuleCompression] = []
    stored_err2, biased = 0.0, 0
    for module in adapter.modules():
        if not isinstance(module, LoraModule):  # the audit saw none; the file changed since
            raise AdapterError(f"{adapter.weights_path}: module {module.name}: {module.message}")
        biased += module.lora_bias is not None
        row, err2 = _compress_module(adapter, module, keys[module.name], targets[module.name], tensors)
        rows.append(row)
        stored_err2 += err2
    for name in adapter.other_tensors:
        tensors[name] = adapter.file.read(name)
    settings = adapter.settings
    ranks = {m.name: m.r_after for m in rows}
    r_new = global_rank(ranks)
    names = [m.name for m in rows]
    config = dict(settings.raw)
    config.update(
        r=r_new,
        rank_pattern=exact_pattern_keys({n: k for n, k in ranks.items() if k != r_new}, names),
        alpha_pattern=exact_pattern_keys(
            {m.name: m.alpha for m in rows if m.alpha != settings.lora_alpha}, names
        ),
    )
    save_adapter(out, config, tensors)
    notes = [
        f"input {label} keys that match no module were dropped: {', '.join(ks)}"
        for label, ks in adapter.unmatched_pattern_keys().items()
    ]
    notes += [w for w in (adapter.init_warning(),) if w] + adapter.pattern_overlaps()
    if biased:
        notes.append(f"{biased} module(s) carry lora_B.bias: rescaled by scale_before/scale_after so scale·b is unchanged")
    report = _report(audited, out, selector, value, r_new, rows, stored_err2, settings.use_rslora, notes)
    if verify is None or before is None:
        return report
    after = _score(verify, out)
    name = getattr(verify, "description", None) or getattr(verify, "__name__", None) or repr(verify)
    return dataclasses.replace(report, verify=Verification(str(name), before, after, _delta(before, after)))


def _delta(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, a in after.items():
        if key in before:
            b = before[key]
            out[key] = a - b if a is not None and b is not None else None
    return out


def _score(verify: EvalFn, adapter_dir: Path) -> dict[str, float | None]:
    """Run the caller's eval; numbers become floats, NaN/Inf become None, other values are dropped."""
    metrics = verify(adapter_dir)
    if not isinstance(metrics, Mapping):
        raise UsageError(f"verify({adapter_dir}) returned {type(metrics).__name__}; it must return a dict of metrics")
    out: dict[str, float | None] = {}
    for key, v in metrics.items():
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            out[str(key)] = float(v) if math.isfinite(float(v)) else None
    return out


def _selector(
    rank: int | None, energy: float | None, policy: str | None, budget: int | None
) -> tuple[str, Any]:
    given = {k: v for k, v in (("rank", rank), ("energy", energy), ("policy", policy), ("budget_params", budget)) if v is not None}
    if len(given) != 1:
        raise UsageError("give exactly one of --rank, --energy, --policy, --budget-params")
    (name, value), = given.items()
    if name in ("rank", "budget_params") and (isinstance(value, bool) or int(value) != value or value < 1):
        raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if name == "energy" and not 0.0 < float(value) <= 1.0:
        raise UsageError(f"--energy must be in (0, 1], got {value}")
    if name == "policy" and value not in AUDIT_POLICIES and value not in POLICIES:
        raise UsageError(f"unknown --policy {value!r}; choose from {', '.join((*AUDIT_POLICIES, *POLICIES))}")
    return name, value


def _refuse(report: AuditReport) -> None:
    where = report.peft_dir
    if report.use_dora:
        raise UnsupportedAdapterError(
            f"{where}: DoRA adapter; truncating B·A changes the weight norm its magnitude "
            "vector rescales, which needs the base weights (plain LoRA and rsLoRA only)"
        )
    if report.problems:
        p = report.problems[0]
        raise AdapterError(f"{where}: module {p['module']} cannot be read ({p['problem']})")
    bad = [m.name for m in report.modules if m.status == "nonfinite"]
    if bad:
        raise AdapterError(f"{where}: module {bad[0]} holds NaN/Inf weights ({len(bad)} such module(s))")


def _target_ranks(report: AuditReport, selector: str, value: Any) -> dict[str, int]:
    """Kept rank per module, in [1, min(r, in, out)] (a zero update keeps one zero direction)."""
    rows = report.modules
    if selector == "budget_params":
        return budget_ranks(rows, int(value))
    out = {}
    g = report.suggestion
    if g is None and selector == "policy" and value in AUDIT_POLICIES:
        raise UsageError(f"{report.peft_dir}: every module's update is zero; there is no rank suggestion to apply")
    for m in rows:
        sigma = np.asarray(m.singular_values)
        if selector == "rank":
            k = int(value)
        elif selector == "energy":
            k = energy_policy(sigma, float(value))
        elif m.status == "zero":  # an untrained module: keep one (zero) direction, whatever the policy
            k = 1
        elif value == "median" and g is not None:
            k = g.uniform_median
        elif value == "p90" and g is not None:
            k = g.uniform_p90
        elif value == "per-module" and g is not None:
            k = g.rank_pattern[m.name]
        else:
            k = POLICIES[value](sigma, m.shape)
        out[m.name] = max(1, min(k, sigma.size))
    return out


def budget_ranks(rows: Sequence[ModuleAudit], budget: int) -> dict[str, int]:
    """Greedy ranks under a LoRA-parameter budget (one rank costs in + out parameters).

    Every module starts at rank 1; then the increment with the largest σ²_{k+1} / (in + out)
    anywhere is taken while it fits. A module whose next increment does not fit drops out
    (its later ones cost the same and are worth less). Directions below the numerical-rank
    tolerance (σ ≤ σ₁ · max(out, in) · eps(float32)) are never bought. Energy is absolute
    (of the scaled update), so the greedy choice minimises the adapter's total squared
    Frobenius error for the parameters spent.
    """
    cost = {m.name: m.shape[0] + m.shape[1] for m in rows}
    ranks = dict.fromkeys(cost, 1)
    left = budget - sum(cost.values())
    if left < 0:
        raise UsageError(f"--budget-params {budget} is below the minimum {budget - left} (rank 1 in every module)")

    def push(i: int, m: ModuleAudit, j: int) -> None:
        sigma = m.singular_values
        if j < len(sigma) and sigma[j] > sigma[0] * max(m.shape) * FLOAT32_EPS:
            heapq.heappush(heap, (-sigma[j] ** 2 / cost[m.name], i, j, m))

    heap: list[tuple[float, int, int, ModuleAudit]] = []
    for i, m in enumerate(rows):
        push(i, m, 1)
    while heap:
        _, i, j, m = heapq.heappop(heap)
        if cost[m.name] <= left:
            ranks[m.name] += 1
            left -= cost[m.name]
            push(i, m, j + 1)
    return ranks


def _compress_module(
    adapter: Adapter, m: LoraModule, keys: tuple[str, str], k: int, tensors: dict[str, np.ndarray]
) -> tuple[ModuleCompression, float]:
    """Write module `m` at rank k into `tensors`; returns its row and its squared storage error."""
    key_a, key_b = keys
    u, sigma, vt = core_svd(m.lora_A, m.lora_B, m.scale)
    total = float(np.sum(np.square(sigma)))
    tail = float(np.sum(np.square(sigma[k:])))
    new_scale = lora_scale(m.alpha, k, adapter.settings.use_rslora)
    err2 = 0.0
    if k == m.r:  # nothing to drop: keep the stored bits as they are
        tensors[key_a], tensors[key_b] = adapter.file.read(key_a), adapter.file.read(key_b)
        if m.lora_bias is not None:
            tensors[bias_key(key_b)] = adapter.file.read(bias_key(key_b))
    else:
        if m.lora_bias is not None:  # PEFT adds scale · b: keep the product, not b
            err2 += rescale_bias(m.lora_bias, m.scale, new_scale, bias_key(key_b), tensors)
        a, b = split_factors(u[:, :k], sigma[:k], vt[:k], new_scale)
        sa, sb = adapter.file.read(key_a), adapter.file.read(key_b)
        tensors[key_a], tensors[key_b] = to_stored(m.kind, a, b, sa.shape, sb.shape, sa.dtype, sb.dtype)
        wa, wb = from_stored(m.kind, tensors[key_a], tensors[key_b])
        err2 = factored_distance(wa, new_scale * wb, vt[:k], u[:, :k] * sigma[:k]) ** 2
    row = ModuleCompression(
        name=m.name, kind=m.kind, shape=m.shape, r_before=m.r, r_after=k, alpha=m.alpha,
        scale_before=m.scale, scale_after=new_scale, params_before=m.params,
        params_after=k * (m.shape[0] + m.shape[1]),
        retained_energy=(total - tail) / total if total > 0 else 1.0,
        relative_frobenius_error=math.sqrt(tail / total) if total > 0 else 0.0,
        relative_spectral_error=float(sigma[k] / sigma[0]) if k < sigma.size and sigma[0] > 0 else 0.0,
    )
    return row, err2


def _report(
    audited: AuditReport, out: Path, selector: str, value: Any, r_new: int,
    rows: list[ModuleCompression], stored_err2: float, use_rslora: bool, notes: Sequence[str],
) -> CompressReport:
    energies = [(m.frobenius_norm or 0.0) ** 2 for m in audited.modules]
    total = sum(energies)
    tails = sum(e * row.relative_frobenius_error**2 for e, row in zip(energies, rows, strict=True))
    before, after = sum(m.params_before for m in rows), sum(m.params_after for m in rows)
    warnings = list(notes)
    unchanged = [m.name for m in rows if m.r_after == m.r_before]
    if unchanged and selector == "rank":
        warnings.append(f"{len(unchanged)} module(s) already at or below rank {value}: copied unchanged")
    return CompressReport(
        peft_dir=str(audited.peft_dir), out_dir=str(out), selector=selector, value=str(value), r=r_new,
        lora_alpha=audited.lora_alpha, use_rslora=use_rslora, params_before=before,
        params_after=after, param_reduction=1.0 - after / before if before else 0.0,
        retained_energy=(total - tails) / total if total > 0 else 1.0,
        relative_frobenius_error=math.sqrt(max(tails, 0.0) / total) if total > 0 else 0.0,
        relative_spectral_error=max((m.relative_spectral_error for m in rows), default=0.0),
        storage_error=math.sqrt(stored_err2 / total) if total > 0 else 0.0,
        warnings=tuple(warnings), modules=tuple(rows),
    )
