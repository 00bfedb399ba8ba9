"""`analyze`: is adapter structure a usable stand-in for eval loss in these runs?

For each run log: the logging cadence, then per structural metric the same-step
correlation with eval loss, the cross-correlation over lags, Granger tests both ways, a
ridge forecast of eval loss from all the metrics, and an early-stopping replay. With
several runs (seeds), an aggregate: mean ± sd of r per metric and agreement of best lags.

Every pair is taken on exactly shared steps. A lead or lag is only read where each eval
step has the metric at that same step and there are at least `MIN_LAG_POINTS` of them;
otherwise `best_lag` is None with `lead_lag_refused` and a reason. A lag read from
mismatched cadences is an artifact of the logging, not a property of training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from gradience.analysis.aggregate import aggregate_runs
from gradience.analysis.align import Cadence, RunSeries, align_exact, load_run
from gradience.analysis.correlation import (
    BASES,
    Basis,
    Ccf,
    Correlation,
    ccf,
    pearson,
    spearman,
)
from gradience.analysis.early_stop import (
    EarlyStopPolicy,
    simulate_early_stop,
)
from gradience.analysis.forecast import ridge_forecast
from gradience.analysis.granger import granger
from gradience.analysis.results import (
    DEFAULT_METRICS,
    MIN_LAG_POINTS,
    AnalysisReport,
    Forecast,
    Pair,
    RunAnalysis,
)
from gradience.errors import UsageError, require


def _refusal(run: RunSeries, n: int, cadence: Cadence) -> str | None:
    missing = len(run.eval_loss) - n
    if missing > 0:
        return (
            f"eval grid not covered: {missing} of {len(run.eval_loss)} eval steps have no value "
            f"at the same step (structural every {cadence.structural_every}, eval every "
            f"{cadence.eval_every}); log structure at every eval step"
        )
    if n < MIN_LAG_POINTS:
        return f"only {n} exactly matched points; lead/lag needs at least {MIN_LAG_POINTS}"
    return None


def analyze_pair(
    run: RunSeries, metric: str, cadence: Cadence, max_lag: int = 3, basis: Basis = "differences"
) -> Pair:
    """Correlations and, where allowed, lead/lag of one metric against eval loss in one run."""
    series = run.metric(metric)
    if series is None:
        why = f"`{metric}` is not in this log"
        none = Correlation(None, None, 0, why)
        return Pair(
            run.path, metric, 0, none, none, none, False, None, True, why, None, None, basis
        )
    pair = align_exact(series, run.eval_loss)
    n = len(pair)
    refusal = _refusal(run, n, cadence)
    lag_ccf: dict[str, Ccf] | None = None
    granger_result, lag = None, None
    if refusal is None:
        lag_ccf = {b: ccf(pair.x, pair.y, max_lag, b) for b in BASES}
        lag = lag_ccf[basis].best_lag
        granger_result = granger(pair.x, pair.y, max_lag, basis)
    return Pair(
        run.path, metric, n, pearson(pair.x, pair.y), spearman(pair.x, pair.y),
        pearson(np.diff(pair.x), np.diff(pair.y)), n == len(run.eval_loss) and n > 0,
        lag, refusal is not None, refusal, lag_ccf, granger_result, basis,
    )  # fmt: skip


def forecast_run(
    run: RunSeries, metrics: Sequence[str], alpha: float = 1.0, train_fraction: float = 0.7
) -> Forecast:
    """Ridge nowcast on the eval steps where every metric was logged; one-step-ahead only
    when those steps are the whole eval grid (so "next" means the next eval)."""
    found = {m: s for m in metrics if (s := run.metric(m)) is not None}
    present = list(found)
    if not present:
        return Forecast(
            (), alpha, train_fraction, 0, None, None, "none of the metrics is in this log"
        )
    steps = run.eval_loss.steps
    for series in found.values():
        steps = np.intersect1d(steps, series.steps, assume_unique=True)
    columns = [s.values[np.searchsorted(s.steps, steps)] for s in found.values()]
    y = run.eval_loss.values[np.searchsorted(run.eval_loss.steps, steps)]
    X = np.column_stack(columns) if steps.size else np.empty((0, len(present)))
    nowcast = ridge_forecast(X, y, 0, alpha, train_fraction)
    one_step, reason = None, None
    if steps.size == len(run.eval_loss):
        one_step = ridge_forecast(X, y, 1, alpha, train_fraction)
    else:
        reason = (
            f"one-step-ahead refused: {len(run.eval_loss) - steps.size} eval steps lack a "
            "structural record, so the next matched step is not the next eval"
        )
    return Forecast(
        tuple(present), alpha, train_fraction, int(steps.size), nowcast, one_step, reason
    )


def analyze_run(
    run: RunSeries,
    metrics: Sequence[str] = DEFAULT_METRICS,
    max_lag: int = 3,
    basis: Basis = "differences",
    ridge_alpha: float = 1.0,
    train_fraction: float = 0.7,
    policy: EarlyStopPolicy | None = None,
) -> RunAnalysis:
    """All of `analyze` for one already-loaded run."""
    cadence = run.cadence()
    pairs = tuple(analyze_pair(run, m, cadence, max_lag, basis) for m in metrics)
    forecast = forecast_run(run, metrics, ridge_alpha, train_fraction)
    structural = {m: s for m in metrics if (s := run.metric(m)) is not None}
    early = simulate_early_stop(run.eval_loss, structural, policy)
    notes = list(run.notes)
    declared = run.declared_structural_interval
    if declared is not None and cadence.structural_every not in (None, declared):
        notes.append(
            f"run_start declares structural_interval={declared}, but structural records "
            f"are {cadence.structural_every} steps apart"
        )
    gaps = np.diff(run.eval_loss.steps)[:-1]  # the last gap may be a final eval
    if cadence.eval_every is not None and bool(np.any(gaps != cadence.eval_every)):
        notes.append(
            f"eval steps are irregular ({int(np.sum(gaps != cadence.eval_every))} gaps differ "
            f"from {cadence.eval_every} steps); lags count evals, not steps"
        )
    return RunAnalysis(
        run.path, run.run_id, run.target_split, run.splits, cadence, pairs, forecast, early,
        tuple(notes),
    )  # fmt: skip


def analyze(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    target_split: str | None = None,
    max_lag: int = 3,
    *,
    basis: Basis = "differences",
    ridge_alpha: float = 1.0,
    train_fraction: float = 0.7,
    policy: EarlyStopPolicy | None = None,
) -> AnalysisReport:
    """Analyse structure against eval loss in one or more run logs (e.g. seeds of one setup).

    Args:
        paths: run logs (`run.jsonl`); one path is accepted too.
        metrics: structural metrics (or `train_step` fields such as `grad_norm`) to test.
        target_split: eval split whose loss is the target; default test > eval > validation.
        max_lag: largest lag, in eval intervals, for cross-correlation and Granger.
        basis: "differences" (default) or "levels" for the lag analysis and Granger.
        ridge_alpha, train_fraction: ridge penalty and time-ordered train share.
        policy: early-stop rule parameters.

    Returns:
        `AnalysisReport` (see its docstring for the JSON shape).

    Raises:
        UsageError: no path, a missing file, or a bad parameter.
        TelemetryError: a log without eval loss or structural records.
        MissingDependencyError: scipy absent (`pip install gradience[analysis]`).

    Example:
        >>> report = analyze(["seed42/run.jsonl", "seed123/run.jsonl"])  # doctest: +SKIP
        >>> report.to_dict()["cadence"]["matched"]  # doctest: +SKIP
        True
    """
    logs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    metrics = tuple(metrics)
    if not logs:
        raise UsageError("no run log given; pass at least one run.jsonl")
    if not metrics:
        raise UsageError("no metrics given; name at least one structural metric")
    if max_lag < 1:
        raise UsageError(f"`max_lag` must be at least 1, got {max_lag}")
    if basis not in BASES:
        raise UsageError(f"`basis` must be one of {', '.join(BASES)}, got {basis!r}")
    if not (0.0 <= ridge_alpha < math.inf and 0.0 < train_fraction < 1.0):
        raise UsageError("`ridge_alpha` must be >= 0 and `train_fraction` in (0, 1)")
    require("scipy", "analysis")  # scipy.special's distribution tails (`analysis._stats`)
    runs = tuple(
        analyze_run(
            load_run(p, target_split, train_fields=metrics), metrics, max_lag, basis, ridge_alpha,
            train_fraction, policy,
        )
        for p in logs
    )
    aggregate = aggregate_runs(runs, metrics) if len(runs) > 1 else None
    return AnalysisReport(metrics, max_lag, basis, runs, aggregate)
