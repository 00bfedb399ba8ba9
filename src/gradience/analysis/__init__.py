"""Structure as an eval proxy: exact-step alignment, correlation, lead/lag, forecasts, stops.

Reads run logs written by Gradience telemetry and asks how closely the adapter's structural
metrics track eval loss. Importing this package needs numpy only; scipy.special
(`pip install gradience[analysis]`) is imported by the functions that need a p-value. The
statistics are numpy code checked against scipy.stats and statsmodels in the tests, which
are not imported here (about 3 s on a small machine).

Lag convention: a positive lag means structure LEADS eval loss (see `correlation`).

    from gradience.analysis import analyze

    report = analyze(["runs/seed42/run.jsonl", "runs/seed123/run.jsonl"])
    print(report.to_dict()["cadence"])
"""

from __future__ import annotations

from gradience.analysis.aggregate import aggregate_runs
from gradience.analysis.align import (
    Aligned,
    Cadence,
    RunSeries,
    Series,
    align_exact,
    choose_split,
    detect_cadence,
    forward_fill_align,
    load_run,
    modal_step,
    unmatched_steps,
)
from gradience.analysis.correlation import (
    LAG_CONVENTION,
    Ccf,
    Correlation,
    best_lag,
    ccf,
    cross_correlation,
    pearson,
    spearman,
)
from gradience.analysis.early_stop import (
    EarlyStop,
    EarlyStopPolicy,
    StopOutcome,
    eval_patience_stop,
    plateau_stop,
    relative_change,
    simulate_early_stop,
)
from gradience.analysis.forecast import (
    ForecastScore,
    RidgeModel,
    r2_score,
    ridge_fit,
    ridge_forecast,
)
from gradience.analysis.granger import Granger, GrangerTest, granger, granger_test
from gradience.analysis.report import analyze, analyze_run
from gradience.analysis.results import (
    DEFAULT_METRICS,
    MIN_LAG_POINTS,
    NOT_PREDICTION,
    Aggregate,
    AnalysisReport,
    Forecast,
    MetricAggregate,
    Pair,
    RunAnalysis,
)

__all__ = [
    "DEFAULT_METRICS",
    "LAG_CONVENTION",
    "MIN_LAG_POINTS",
    "NOT_PREDICTION",
    "Aggregate",
    "Aligned",
    "AnalysisReport",
    "Cadence",
    "Ccf",
    "Correlation",
    "EarlyStop",
    "EarlyStopPolicy",
    "Forecast",
    "ForecastScore",
    "Granger",
    "GrangerTest",
    "MetricAggregate",
    "Pair",
    "RidgeModel",
    "RunAnalysis",
    "RunSeries",
    "Series",
    "StopOutcome",
    "aggregate_runs",
    "align_exact",
    "analyze",
    "analyze_run",
    "best_lag",
    "ccf",
    "choose_split",
    "cross_correlation",
    "detect_cadence",
    "eval_patience_stop",
    "forward_fill_align",
    "granger",
    "granger_test",
    "load_run",
    "modal_step",
    "pearson",
    "plateau_stop",
    "r2_score",
    "relative_change",
    "ridge_fit",
    "ridge_forecast",
    "simulate_early_stop",
    "spearman",
    "unmatched_steps",
]
