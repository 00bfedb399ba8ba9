"""Several runs of one setup (seeds): how stable are the correlations and the best lags?

Mean ± sample sd of each metric's Pearson and Spearman r across runs; the best lag of each
run (None where it was refused or undefined), the most common one and the share of runs
that agree with it; forecast R² and early-stop regret averaged across runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradience.analysis._finite import fin
from gradience.analysis.early_stop import StopOutcome
from gradience.analysis.results import Aggregate, MetricAggregate, RunAnalysis


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = np.array([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return None, None
    sd = float(vals.std(ddof=1)) if vals.size > 1 else None
    return fin(vals.mean()), fin(sd)


def aggregate_runs(runs: Sequence[RunAnalysis], metrics: Sequence[str]) -> Aggregate:
    """Mean ± sd (sample sd) across runs of each metric's r; best-lag agreement."""
    rows = []
    for metric in metrics:
        pairs = [p for r in runs for p in r.pairs if p.metric == metric]
        pr, ps = _mean_sd([p.pearson.r for p in pairs]), _mean_sd([p.spearman.r for p in pairs])
        lags = tuple(p.best_lag for p in pairs)
        known = [lag for lag in lags if lag is not None]
        modal, agreement = None, None
        if known:
            modal = Counter(known).most_common(1)[0][0]
            agreement = fin(known.count(modal) / len(known))
        n_r = sum(p.pearson.r is not None for p in pairs)
        refused = sum(p.lead_lag_refused for p in pairs)
        rows.append(MetricAggregate(metric, n_r, *pr, *ps, lags, modal, agreement, refused))
    now = _mean_sd([r.forecast.nowcast.r2 if r.forecast.nowcast else None for r in runs])
    persist, _ = _mean_sd(
        [r.forecast.nowcast.persistence_r2 if r.forecast.nowcast else None for r in runs]
    )
    return Aggregate(len(runs), tuple(rows), *now, persist, _aggregate_stops(runs))


def _aggregate_stops(runs: Sequence[RunAnalysis]) -> tuple[dict[str, Any], ...]:
    groups: dict[tuple[str, str], list[StopOutcome]] = {}
    for r in runs:
        for o in r.early_stop.outcomes:
            groups.setdefault((o.rule, o.signal), []).append(o)
    rows = []
    for (rule, signal), outs in groups.items():
        regret_mean, regret_sd = _mean_sd([o.regret for o in outs])
        rows.append({
            "rule": rule, "signal": signal, "runs": len(outs),
            "stopped_runs": sum(o.stopped for o in outs),
            "regret_mean": regret_mean, "regret_sd": regret_sd,
            "eval_calls_mean": _mean_sd([float(o.eval_calls) for o in outs])[0],
        })  # fmt: skip
    return tuple(rows)
