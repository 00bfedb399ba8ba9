"""The result types of `analyze`: one run's pairs, forecast and early stop, and the report.

They live apart from the code that computes them so that the per-run analysis and the
cross-run aggregate can both use them without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gradience.analysis.align import Cadence
from gradience.analysis.correlation import LAG_CONVENTION, Basis, Ccf, Correlation
from gradience.analysis.early_stop import EarlyStop
from gradience.analysis.forecast import ForecastScore
from gradience.analysis.granger import Granger


@dataclass(frozen=True)
class MetricAggregate:
    """One metric across runs: spread of r and whether the runs agree on the best lag."""

    metric: str
    runs: int  # runs with a defined Pearson r
    pearson_r_mean: float | None
    pearson_r_sd: float | None
    spearman_r_mean: float | None
    spearman_r_sd: float | None
    best_lags: tuple[int | None, ...]  # per run, in input order; None = refused/undefined
    modal_best_lag: int | None
    lag_agreement: float | None  # share of runs with a lag whose lag is the modal one
    refused_runs: int


@dataclass(frozen=True)
class Aggregate:
    """Across runs (seeds): per-metric spread, forecast R² and early-stop regret."""

    n_runs: int
    metrics: tuple[MetricAggregate, ...]
    nowcast_r2_mean: float | None
    nowcast_r2_sd: float | None
    persistence_r2_mean: float | None
    early_stop: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



SCHEMA = "gradience.analysis/1"
TARGET = "eval_loss"
DEFAULT_METRICS: tuple[str, ...] = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90")
MIN_LAG_POINTS = 8
NOT_PREDICTION = (
    "Correlation is not prediction: these numbers describe the logged runs only. "
    "Gradience instruments; you decide when to evaluate and when to stop."
)


@dataclass(frozen=True)
class Pair:
    """One structural metric against eval loss in one run, on exactly shared steps."""

    run: str
    metric: str
    n: int
    pearson: Correlation
    spearman: Correlation
    pearson_differences: Correlation
    covered: bool  # every eval step has this metric at the same step
    best_lag: int | None
    lead_lag_refused: bool
    lead_lag_reason: str | None
    ccf: dict[str, Ccf] | None
    granger: Granger | None
    basis: Basis = "differences"

    def to_dict(self) -> dict[str, Any]:
        ccf_d: dict[str, Any] | None = None
        if self.ccf is not None:
            ccf_d = {"basis": self.basis, "convention": LAG_CONVENTION}
            ccf_d.update({b: c.to_dict() for b, c in self.ccf.items()})
        return {
            "run": self.run, "metric": self.metric, "target": TARGET, "n": self.n,
            "pearson_r": self.pearson.r, "pearson_p": self.pearson.p,
            "spearman_r": self.spearman.r, "spearman_p": self.spearman.p,
            "pearson_r_differences": self.pearson_differences.r,
            "correlation_note": self.pearson.reason,
            "covered": self.covered, "best_lag": self.best_lag,
            "lead_lag_refused": self.lead_lag_refused, "lead_lag_reason": self.lead_lag_reason,
            "ccf": ccf_d, "granger": None if self.granger is None else self.granger.to_dict(),
        }  # fmt: skip


@dataclass(frozen=True)
class Forecast:
    """Ridge nowcast and one-step-ahead forecast of eval loss from the structural metrics."""

    features: tuple[str, ...]
    alpha: float
    train_fraction: float
    n: int
    nowcast: ForecastScore | None
    one_step: ForecastScore | None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features), "alpha": self.alpha,
            "train_fraction": self.train_fraction, "n": self.n,
            "nowcast": None if self.nowcast is None else self.nowcast.to_dict(),
            "one_step": None if self.one_step is None else self.one_step.to_dict(),
            "reason": self.reason,
        }  # fmt: skip


@dataclass(frozen=True)
class RunAnalysis:
    """Everything `analyze` found in one run log."""

    path: str
    run_id: str | None
    target_split: str
    splits: tuple[str, ...]
    cadence: Cadence
    pairs: tuple[Pair, ...]
    forecast: Forecast
    early_stop: EarlyStop
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "run_id": self.run_id, "target_split": self.target_split,
            "splits": list(self.splits), "cadence": self.cadence.to_dict(),
            "pairs": [p.to_dict() for p in self.pairs], "forecast": self.forecast.to_dict(),
            "early_stop": self.early_stop.to_dict(), "notes": list(self.notes),
        }  # fmt: skip


@dataclass(frozen=True)
class AnalysisReport:
    """Result of `analyze`; `to_dict()` is what `gradience analyze --json` prints.

    For one run, the top-level `cadence`, `pairs`, `forecast` and `early_stop` are that
    run's. For several, `cadence` is combined (matched only if every run is; a cadence
    is given only where all runs share it), `pairs` lists every run's pairs (each names
    its `run`), `forecast` and `early_stop` are None, and `aggregate` summarises; each
    run's full result is under `runs`.
    """

    metrics: tuple[str, ...]
    max_lag: int
    basis: Basis
    runs: tuple[RunAnalysis, ...]
    aggregate: Aggregate | None

    @property
    def cadence(self) -> Cadence:
        return combine_cadences([r.cadence for r in self.runs])

    def to_dict(self) -> dict[str, Any]:
        single = self.runs[0] if len(self.runs) == 1 else None
        return {
            "schema": SCHEMA, "target": TARGET, "metrics": list(self.metrics),
            "max_lag": self.max_lag, "basis": self.basis, "lag_convention": LAG_CONVENTION,
            "cadence": self.cadence.to_dict(),
            "pairs": [p.to_dict() for r in self.runs for p in r.pairs],
            "forecast": single.forecast.to_dict() if single else None,
            "early_stop": single.early_stop.to_dict() if single else None,
            "runs": [r.to_dict() for r in self.runs],
            "aggregate": None if self.aggregate is None else self.aggregate.to_dict(),
            "note": NOT_PREDICTION,
        }  # fmt: skip


def combine_cadences(cadences: Sequence[Cadence]) -> Cadence:
    """One cadence for several runs: counts summed, an interval only where all runs agree."""

    def common(values: list[int | None]) -> int | None:
        return values[0] if len(set(values)) == 1 else None

    return Cadence(
        matched=all(c.matched for c in cadences),
        structural_every=common([c.structural_every for c in cadences]),
        eval_every=common([c.eval_every for c in cadences]),
        unmatched_eval_steps=sum(c.unmatched_eval_steps for c in cadences),
        eval_steps=sum(c.eval_steps for c in cadences),
        structural_steps=sum(c.structural_steps for c in cadences),
        matched_steps=sum(c.matched_steps for c in cadences),
        declared_structural_interval=common([c.declared_structural_interval for c in cadences]),
    )
