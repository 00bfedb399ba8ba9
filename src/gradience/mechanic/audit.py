"""Spectral audit of a saved LoRA adapter: where rank is used, where it is wasted.

`audit(path)` reads the adapter a module at a time, computes each update's spectrum with
the QR core, and returns an `AuditReport`: per-module metrics, aggregates, the least
rank-used modules (lowest utilization), a per-type and per-layer view, and rank
suggestions. Suggestions are hypotheses about the adapter's geometry; only an eval can
confirm them. Modules whose update is exactly zero are counted and listed, and left out of
every aggregate and suggestion (an untrained module says nothing about the rank it needs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradience._quantile import median, percentile
from gradience.errors import UsageError
from gradience.lora.reader import Adapter, LoraModule, ModuleProblem, layer_index, module_type
from gradience.spectrum import NonFiniteFactors, core_singular_values, spectrum_metrics

if TYPE_CHECKING:  # imported when --base-model asks for it: hashing and the shard scan cost ~10 ms
    from gradience.mechanic.base_relative import BaseRelativeSummary

HYPOTHESIS_NOTE = (
    "Suggested ranks describe this adapter's geometry, not its quality: "
    "treat them as hypotheses and verify with an eval on held-out data."
)
DORA_NOTE = (
    "DoRA adapter: the audit covers the low-rank B·A part only; the magnitude vector "
    "rescales the merged weight and needs the base weights to account for."
)


@dataclass(frozen=True)
class ModuleAudit:
    """Metrics of one module's update ΔW = scale · B · A (names as in DESIGN.md)."""

    name: str
    type: str
    layer: int | None
    kind: str
    shape: tuple[int, int]
    r: int
    alpha: float
    scale: float
    params: int
    status: str  # "ok", "zero" or "nonfinite"
    frobenius_norm: float | None = None
    sigma_max: float | None = None
    stable_rank: float | None = None
    utilization: float | None = None
    energy_rank_90: int | None = None
    energy_rank: int | None = None
    effective_rank: float | None = None
    numerical_rank: int | None = None
    singular_values: tuple[float, ...] = ()
    rel_spectral: float | None = None  # ‖ΔW‖₂/‖W‖₂, with --base-model only
    rel_frobenius: float | None = None  # ‖ΔW‖_F/‖W‖_F, with --base-model only
    energy_share: float | None = None  # ‖ΔW‖_F² over the adapter's total (ok modules)
    lora_bias_norm: float | None = None  # ‖scale · b‖ of lora_B's bias (lora_bias=True), not in the spectrum


@dataclass(frozen=True)
class Summary:
    """Aggregates over modules with status `ok`: zero and non-finite ones are counted and listed, not averaged.

    `energy_rank_p50` / `energy_rank_p90` are always percentiles of `energy_rank_90`;
    another `--energy q` adds `energy_rank_<q>_p50` / `_p90` (in `other_energy`, flattened
    into the JSON).
    """

    lora_params: int
    n_modules: int
    n_layers: int
    n_zero: int
    zero_modules: tuple[str, ...]
    n_nonfinite: int
    stable_rank_mean: float
    stable_rank_median: float
    utilization_mean: float
    utilization_median: float
    energy_rank_p50: float
    energy_rank_p90: float
    effective_rank_mean: float
    frobenius_norm_total: float
    sigma_max_max: float
    other_energy: dict[str, float] = field(default_factory=dict)


def energy_field(q: float) -> str:
    """The field name of the energy rank at fraction q: 0.9 -> `energy_rank_90`, 0.995 -> `energy_rank_99_5`."""
    return "energy_rank_" + f"{100 * q:.4f}".rstrip("0").rstrip(".").replace(".", "_")


@dataclass(frozen=True)
class TypeBreakdown:
    type: str
    n_modules: int
    params: int
    stable_rank_mean: float
    utilization_mean: float
    energy_rank_p50: float
    energy_rank_p90: float


@dataclass(frozen=True)
class LayerGain:
    layer: int
    energy: float  # Σ ‖ΔW‖_F² over the layer's modules
    share: float


@dataclass(frozen=True)
class GainView:
    """How update energy spreads over transformer layers.

    `concentration` is the normalised Herfindahl index of the layer shares: 0 when every
    layer carries the same energy, 1 when one layer carries all of it.
    """

    layers: tuple[LayerGain, ...]
    concentration: float
    top_layers: tuple[int, ...]


@dataclass(frozen=True)
class RankSuggestion:
    grid: tuple[int, ...]
    energy_fraction: float
    uniform_median: int
    uniform_p90: int
    at_allocated_rank: bool  # p90 needs the full rank: the data cannot say if more would help
    rank_pattern: dict[str, int]
    note: str = HYPOTHESIS_NOTE


@dataclass(frozen=True)
class AuditReport:
    """Everything `gradience audit` prints; `to_dict()` is exactly what `--json` prints."""

    peft_dir: str | None  # None for a single weights file
    config_path: str | None  # None for a kohya file, which has no config
    weights_path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    energy_fraction: float
    summary: Summary
    least_rank_used: tuple[ModuleAudit, ...]  # lowest utilization first: most rank left unused
    by_type: tuple[TypeBreakdown, ...]
    gain: GainView
    suggestion: RankSuggestion | None  # None when no module has a nonzero finite update
    warnings: tuple[str, ...]
    problems: tuple[dict[str, str], ...]
    modules: tuple[ModuleAudit, ...] = field(default=(), repr=False)
    format: str = "peft"  # the key grammar: "peft" or "kohya"
    base_relative: BaseRelativeSummary | None = None  # with --base-model only

    @property
    def wasteful(self) -> tuple[ModuleAudit, ...]:
        """Former name of `least_rank_used`."""
        return self.least_rank_used

    def to_dict(self, include_modules: bool = True) -> dict[str, Any]:
        d = asdict(self if include_modules else replace(self, modules=()))  # never copy rows it drops
        d["summary"].update(d["summary"].pop("other_energy"))
        if not include_modules:
            d.pop("modules")
        if self.base_relative is None:  # without --base-model the JSON is what it always was
            d.pop("base_relative")
            for row in [*d["least_rank_used"], *d.get("modules", ())]:
                row.pop("rel_spectral"), row.pop("rel_frobenius")
        return d


def default_grid(max_rank: int) -> tuple[int, ...]:
    """Powers of two up to the allocated rank, plus the rank itself."""
    grid = {1 << k for k in range(max_rank.bit_length()) if (1 << k) <= max_rank}
    return tuple(sorted(grid | {max_rank}))


def round_up(value: float, grid: Sequence[int]) -> int:
    """Smallest grid point ≥ value (the grid's largest point if none is)."""
    for g in sorted(grid):
        if g >= value - 1e-9:
            return int(g)
    return int(max(grid))


class Float64Buffers:
    """Two reusable float64 buffers that the factors are cast into, one module after another.

    A fresh float64 copy of every factor costs more in page faults than in casting (73 ms vs
    18 ms over a 7B-shaped adapter's 128 modules): reusing the memory keeps the cast at the
    speed of the copy. The views it returns are valid until the next cast into the same slot.
    """

    def __init__(self) -> None:
        self._buffers = [np.empty(0), np.empty(0)]

    def cast(self, slot: int, x: Any) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == np.float64:
            return x
        buf = self._buffers[slot]
        if buf.size < x.size:
            buf = self._buffers[slot] = np.empty(x.size)
        out = buf[: x.size].reshape(x.shape)
        np.copyto(out, x, casting="unsafe")
        return out


def audit_module(module: LoraModule, energy: float = 0.9, buffers: Float64Buffers | None = None) -> ModuleAudit:
    """Metrics of one module; non-finite factors give status `nonfinite`, not an error.

    `buffers` (one per thread) lets a loop over modules reuse the float64 casts' memory.
    """
    base = dict(
        name=module.name, type=module_type(module.name, module.kind), layer=layer_index(module.name),
        kind=module.kind, shape=module.shape, r=module.r, alpha=module.alpha, scale=module.scale,
        params=module.params,
    )
    buffers = buffers or Float64Buffers()
    a, b = buffers.cast(0, module.lora_A), buffers.cast(1, module.lora_B)
    bias = None if module.lora_bias is None else np.asarray(module.lora_bias, dtype=np.float64)
    if bias is not None and not np.isfinite(bias).all():
        return ModuleAudit(status="nonfinite", **base)  # type: ignore[arg-type]
    try:  # the factors' finiteness is checked inside, for free on the Cholesky path
        sigma = core_singular_values(a, b, module.scale)
    except NonFiniteFactors:
        return ModuleAudit(status="nonfinite", **base)  # type: ignore[arg-type]
    m = spectrum_metrics(sigma, module.r, module.shape, energy)
    return ModuleAudit(
        status="zero" if m.is_zero else "ok",
        lora_bias_norm=None if bias is None else abs(module.scale) * float(np.linalg.norm(bias)),
        frobenius_norm=m.frobenius_norm, sigma_max=m.sigma_max, stable_rank=m.stable_rank,
        utilization=m.utilization, energy_rank_90=m.energy_rank_90, energy_rank=m.energy_rank,
        effective_rank=m.effective_rank, numerical_rank=m.numerical_rank,
        singular_values=tuple(float(x) for x in sigma),
        **base,  # type: ignore[arg-type]
    )


def audit(
    peft_dir: str | Path | None,
    *,
    adapter_config: str | Path | None = None,
    weights: str | Path | None = None,
    energy: float = 0.9,
    top_least_used: int = 10,
    grid: Sequence[int] | None = None,
    fmt: str = "auto",
    base_model: str | Path | None = None,
    base_cache: str | Path | None = None,
    top_wasteful: int | None = None,
) -> AuditReport:
    """Audit a saved LoRA adapter: a PEFT folder, or one kohya / diffusers safetensors file.

    Args:
        peft_dir: folder with `adapter_config.json` and `adapter_model.safetensors`; None
            to audit the single file `weights` (kohya `lora_down` / `lora_up` / `alpha`).
        adapter_config, weights: override the files inside `peft_dir`.
        fmt: key grammar, `auto`, `peft` or `kohya` (see `Adapter.open`).
        base_model: folder of the base model's safetensors shards; adds ‖ΔW‖/‖W‖ per module
            (`gradience.mechanic.base_relative`).
        base_cache: cache file for the base weights' norms (default: a user cache dir).
        energy: energy fraction for `energy_rank` and the rank suggestions.
        top_least_used: how many lowest-utilization (least rank-used) modules to list;
            `top_wasteful` is its former name and wins when given.
        grid: ranks the uniform suggestions round up to (default: powers of two ≤ r, and r).

    Returns:
        AuditReport (deterministic: no timestamps).

    Raises:
        UsageError: missing files or bad arguments. AdapterError: unreadable adapter.

    Example:
        >>> report = audit("runs/toy/peft")          # doctest: +SKIP
        >>> report.suggestion.uniform_p90            # doctest: +SKIP
        4
    """
    if not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    top = top_least_used if top_wasteful is None else top_wasteful
    if top < 0:
        raise UsageError(f"--top-least-used must be >= 0, got {top}")
    adapter = Adapter.open(peft_dir, adapter_config, weights, fmt)
    rows: list[ModuleAudit] = []
    problems: list[dict[str, str]] = []
    buffers = Float64Buffers()
    for item in adapter.modules():
        if isinstance(item, ModuleProblem):
            problems.append({"module": item.name, "problem": item.message})
        else:
            rows.append(audit_module(item, energy, buffers))
    report = _report(adapter, peft_dir, _with_shares(rows), problems, energy, top, grid)
    return _with_base(report, base_model, base_cache) if base_model is not None else report


def _with_base(report: AuditReport, base_model: str | Path, base_cache: str | Path | None) -> AuditReport:
    """The report with ‖ΔW‖/‖W‖ on each matched module and a base-relative summary."""
    from gradience.mechanic.base_relative import relative_sizes

    rel = relative_sizes(report.modules, base_model, cache=base_cache)

    def add(m: ModuleAudit) -> ModuleAudit:
        r = rel.modules.get(m.name)
        return replace(m, rel_spectral=r.rel_spectral, rel_frobenius=r.rel_frobenius) if r else m

    modules = tuple(map(add, report.modules))
    larger = [m.name for m in modules if (m.rel_spectral or 0.0) > 1.0]
    flag = (f"{len(larger)} module(s) have an update larger than their base weight (|dW|_2/|W|_2 > 1): "
            f"{', '.join(larger[:5])}",) if larger else ()  # fmt: skip
    return replace(
        report, modules=modules, least_rank_used=tuple(map(add, report.least_rank_used)),
        base_relative=rel.summary, warnings=report.warnings + rel.warnings + flag,
    )


def _with_shares(rows: list[ModuleAudit]) -> list[ModuleAudit]:
    """Each ok module's share of the adapter's update energy Σ‖ΔW‖_F²."""
    total = sum((m.frobenius_norm or 0.0) ** 2 for m in rows if m.status == "ok")
    if total <= 0:
        return rows
    return [replace(m, energy_share=(m.frobenius_norm or 0.0) ** 2 / total) if m.status == "ok" else m for m in rows]


def _report(
    adapter: Adapter, peft_dir: str | Path | None, rows: list[ModuleAudit], problems: list[dict[str, str]],
    energy: float, top_least_used: int, grid: Sequence[int] | None,
) -> AuditReport:
    good = [m for m in rows if m.status == "ok"]  # zero and non-finite updates enter no aggregate
    warnings = _warnings(adapter, rows, problems)
    max_r = max((m.r for m in rows), default=adapter.settings.r)
    return AuditReport(
        peft_dir=None if peft_dir is None else str(peft_dir),
        config_path=None if adapter.config_path is None else str(adapter.config_path),
        weights_path=str(adapter.weights_path), r=adapter.settings.r,
        lora_alpha=adapter.settings.lora_alpha, use_rslora=adapter.settings.use_rslora,
        use_dora=adapter.is_dora,
        energy_fraction=energy,
        summary=_summary(rows, good, energy),
        least_rank_used=tuple(sorted(good, key=lambda m: (m.utilization or 0.0, m.name))[:top_least_used]),
        by_type=_by_type(good), gain=_gain(good),
        suggestion=_suggest(good, energy, tuple(grid) if grid else default_grid(max_r)) if good else None,
        warnings=tuple(warnings), problems=tuple(problems), modules=tuple(rows), format=adapter.format,
    )


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else 0.0


def _median(xs: Sequence[float]) -> float:
    return median(xs) if xs else 0.0


def _pct(xs: Sequence[float], q: float) -> float:
    return percentile(xs, q) if xs else 0.0


def _summary(rows: list[ModuleAudit], good: list[ModuleAudit], energy: float) -> Summary:
    sr = [m.stable_rank or 0.0 for m in good]
    ut = [m.utilization or 0.0 for m in good]
    er = [float(m.energy_rank_90 or 0) for m in good]
    other = {}
    if energy_field(energy) != "energy_rank_90":
        eq = [float(m.energy_rank or 0) for m in good]
        other = {f"{energy_field(energy)}_p50": _pct(eq, 50), f"{energy_field(energy)}_p90": _pct(eq, 90)}
    zero = tuple(m.name for m in rows if m.status == "zero")
    return Summary(
        lora_params=sum(m.params for m in rows), n_modules=len(rows),
        n_layers=len({m.layer for m in rows if m.layer is not None}),
        n_zero=len(zero), zero_modules=zero, n_nonfinite=sum(m.status == "nonfinite" for m in rows),
        other_energy=other,
        stable_rank_mean=_mean(sr), stable_rank_median=_median(sr),
        utilization_mean=_mean(ut), utilization_median=_median(ut),
        energy_rank_p50=_pct(er, 50), energy_rank_p90=_pct(er, 90),
        effective_rank_mean=_mean([m.effective_rank or 0.0 for m in good]),
        frobenius_norm_total=math.sqrt(sum((m.frobenius_norm or 0.0) ** 2 for m in good)),
        sigma_max_max=max((m.sigma_max or 0.0 for m in good), default=0.0),
    )


def _by_type(good: list[ModuleAudit]) -> tuple[TypeBreakdown, ...]:
    groups: dict[str, list[ModuleAudit]] = defaultdict(list)
    for m in good:
        groups[m.type].append(m)
    out = []
    for t in sorted(groups):
        ms = groups[t]
        er = [float(m.energy_rank_90 or 0) for m in ms]
        out.append(TypeBreakdown(
            type=t, n_modules=len(ms), params=sum(m.params for m in ms),
            stable_rank_mean=_mean([m.stable_rank or 0.0 for m in ms]),
            utilization_mean=_mean([m.utilization or 0.0 for m in ms]),
            energy_rank_p50=_pct(er, 50), energy_rank_p90=_pct(er, 90),
        ))
    return tuple(out)


def _gain(good: list[ModuleAudit]) -> GainView:
    energy: dict[int, float] = defaultdict(float)
    for m in good:
        if m.layer is not None:
            energy[m.layer] += (m.frobenius_norm or 0.0) ** 2
    total = sum(energy.values())
    layers = tuple(
        LayerGain(layer=k, energy=v, share=v / total if total > 0 else 0.0) for k, v in sorted(energy.items())
    )
    n = len(layers)
    hhi = sum(g.share**2 for g in layers)
    concentration = (hhi - 1.0 / n) / (1.0 - 1.0 / n) if n > 1 and total > 0 else 0.0
    top = tuple(g.layer for g in sorted(layers, key=lambda g: (-g.share, g.layer))[:3])
    return GainView(layers=layers, concentration=max(0.0, concentration), top_layers=top)


def _suggest(good: list[ModuleAudit], energy: float, grid: tuple[int, ...]) -> RankSuggestion:
    er = [float(m.energy_rank or 0) for m in good]
    p50, p90 = _pct(er, 50), _pct(er, 90)
    max_r = max((m.r for m in good), default=max(grid))
    median, worst = round_up(max(p50, 1.0), grid), round_up(max(p90, 1.0), grid)
    pattern = {m.name: max(1, min(m.r, m.energy_rank or 1)) for m in good}
    return RankSuggestion(
        grid=grid, energy_fraction=energy, uniform_median=min(median, max_r),
        uniform_p90=min(worst, max_r), at_allocated_rank=worst >= max_r, rank_pattern=pattern,
    )


def _warnings(adapter: Adapter, rows: list[ModuleAudit], problems: list[dict[str, str]]) -> list[str]:
    out = []
    for label, keys in adapter.unmatched_pattern_keys().items():
        out.append(f"{label} keys that match no module (typo?): {', '.join(keys)}")
    if adapter.is_dora:
        out.append(DORA_NOTE)
    init = adapter.init_warning()
    if init:
        out.append(init)
    out += adapter.pattern_overlaps()
    biased = [m.name for m in rows if m.lora_bias_norm is not None]
    if biased:
        out.append(f"{len(biased)} module(s) carry lora_B.bias (lora_bias=True): PEFT adds scale·b to the output; "
                   "the spectrum covers B·A only (lora_bias_norm per module)")
    zero = [m.name for m in rows if m.status == "zero"]
    if zero:
        what = "every module" if len(zero) == len(rows) else f"{len(zero)} module(s)"
        out.append(f"{what} have an all-zero update (untrained, or B still at init), left out of every "
                   f"aggregate and suggestion: {', '.join(zero[:5])}")
        if len(zero) == len(rows):
            out.append("no rank suggestion: the adapter's update is zero, it says nothing about the rank it needs")
    bad = [m.name for m in rows if m.status == "nonfinite"]
    if bad:
        out.append(f"{len(bad)} module(s) hold NaN/Inf weights and are left out of the aggregates: {', '.join(bad[:5])}")
    if problems:
        out.append(f"{len(problems)} module(s) could not be read; see problems")
    return out
