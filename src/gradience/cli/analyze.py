"""`gradience analyze`: does adapter structure track eval loss in these run logs?"""

from __future__ import annotations

import argparse
from typing import Any

from gradience.analysis.correlation import BASES
from gradience.analysis.report import analyze
from gradience.analysis.results import (
    DEFAULT_METRICS,
    NOT_PREDICTION,
    AnalysisReport,
    Pair,
    RunAnalysis,
)
from gradience.cli._inputs import add_log_argument, check_names, resolve_log, split_names
from gradience.cli._output import emit_json, header, num, pct
from gradience.runlog.monitor_report import STRUCTURAL_KEYS


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="structure vs eval loss in run logs: cadence, correlation, lead/lag, forecast, early stop",
        description="Join structural snapshots and evals at exactly matched steps, then measure "
        "how structure tracks eval loss: correlation, cross-correlation lead/lag, Granger, a ridge "
        "forecast and early-stop replays. Several logs are seeds of one setup.",
    )
    add_log_argument(p, many=True)
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="NAME",
                   help=f"structural metrics, space or comma separated (default: {' '.join(DEFAULT_METRICS)})")
    p.add_argument("--split", help="eval split whose loss is the target (default: test, then eval, then validation)")
    p.add_argument("--max-lag", type=int, default=3, metavar="K", help="lags -K..K in eval intervals (default 3)")
    p.add_argument("--basis", choices=BASES, default="differences",
                   help="series the lag analysis runs on (default: differences, which removes shared trends)")
    p.add_argument("--json", action="store_true", help="print the AnalysisReport as JSON")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    metrics = check_names(split_names(args.metrics), STRUCTURAL_KEYS, "structural metric")
    report = analyze([resolve_log(r) for r in args.runs], metrics, args.split, args.max_lag, basis=args.basis)
    if args.json:
        emit_json(report)
    else:
        print("\n".join(render(report)))
    return 0


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _lag(x: int | None) -> str:
    return "n/a" if x is None else (f"{x:+d}" if x else "0")


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def render(report: AnalysisReport) -> list[str]:
    out = header("GRADIENCE ANALYZE: structure vs eval loss")
    for run in report.runs:
        out += _render_run(run, report)
    if report.aggregate is not None:
        out += _render_aggregate(report)
    out += ["", NOT_PREDICTION]
    return out


def _render_run(run: RunAnalysis, report: AnalysisReport) -> list[str]:
    c = run.cadence
    splits = ", ".join(run.splits)
    out = [
        "",
        f"Run: {run.path} (run_id {run.run_id}; target: eval loss on `{run.target_split}`; "
        f"splits seen: {splits})",
        "",
        "Cadence:",
        f"  structural records every {num(c.structural_every)} steps ({c.structural_steps} records), "
        f"evals every {num(c.eval_every)} steps ({c.eval_steps} evals)",
        f"  eval steps with a structural record at the same step: {c.matched_steps} of {c.eval_steps}",
    ]
    if not c.matched:
        out += [
            f"  WARNING: CADENCE MISMATCH: {c.unmatched_eval_steps} of {c.eval_steps} eval steps "
            "have no structural record at the same step.",
            f"  WARNING: correlations use the {c.matched_steps} exactly matched steps only; "
            "no value is carried forward and lead/lag is refused.",
        ]
    out += _render_pairs(run.pairs, report)
    out += _render_forecast(run)
    out += _render_early_stop(run)
    if run.notes:
        out += ["", "Notes:"] + [f"  - {n}" for n in run.notes]
    return out


def _granger_cell(pair: Pair) -> str:
    g = pair.granger
    if g is None:
        return "n/a"
    s_e = g.structure_to_eval.min_p if g.structure_to_eval else None
    e_s = g.eval_to_structure.min_p if g.eval_to_structure else None
    return f"{_p(s_e)} / {_p(e_s)}"


def _render_pairs(pairs: tuple[Pair, ...], report: AnalysisReport) -> list[str]:
    out = [
        "",
        f"Structure vs eval loss (exact shared steps; r(Δ) = pearson of first differences; "
        f"lag > 0 = structure leads; lags and Granger on {report.basis}, up to {report.max_lag}):",
        f"  {'metric':<18} {'n':>4} {'pearson':>8} {'spearman':>9} {'r(Δ)':>8} {'best lag':>9}"
        "  granger p (s→e / e→s)",
    ]
    reasons: list[str] = []
    for p in pairs:
        lag = "refused" if p.lead_lag_refused else _lag(p.best_lag)
        out.append(
            f"  {p.metric:<18} {p.n:>4} {_r(p.pearson.r):>8} {_r(p.spearman.r):>9}"
            f" {_r(p.pearson_differences.r):>8} {lag:>9}  {_granger_cell(p)}"
        )
        if p.lead_lag_reason and p.lead_lag_reason not in reasons:
            reasons.append(p.lead_lag_reason)
    out += [f"  lead/lag refused: {r}" for r in reasons]
    return out


def _render_forecast(run: RunAnalysis) -> list[str]:
    f = run.forecast
    split = round(100 * f.train_fraction)
    out = [
        "",
        f"Forecast of eval loss (ridge alpha {num(f.alpha)}, time-ordered {split}/{100 - split} "
        f"split; features: {', '.join(f.features) or 'none'}):",
    ]
    for label, score in (("nowcast (same step)", f.nowcast), ("one step ahead", f.one_step)):
        if score is None:
            continue
        if score.r2 is None and score.reason:
            out.append(f"  {label}: n/a ({score.reason})")
            continue
        out.append(
            f"  {label}: R² {_r(score.r2)} vs persistence {_r(score.persistence_r2)} "
            f"on {score.n_test} held-out evals"
        )
    if f.reason:
        out.append(f"  {f.reason}")
    return out


def _render_early_stop(run: RunAnalysis) -> list[str]:
    e = run.early_stop
    pol = e.policy
    out = [
        "",
        f"Early stopping (eval patience {pol.patience}; plateau: change < {pct(pol.threshold)} over "
        f"{pol.window} points); best eval loss {num(e.best_eval_loss, 4)} at step {num(e.best_step)}:",
        f"  {'rule':<28} {'stop step':>11} {'evals':>6} {'loss at stop':>13} {'regret':>8}",
    ]
    for o in e.outcomes:
        name = f"{o.signal} {'patience' if o.rule == 'eval_patience' else 'plateau'}"
        if o.stop_step is None:
            out.append(f"  {name:<28} n/a ({o.reason})")
            continue
        step = f"{o.stop_step}" + ("" if o.stopped else " (end)")
        out.append(
            f"  {name:<28} {step:>11} {o.eval_calls:>6} {num(o.loss_at_stop, 4):>13} "
            f"{num(o.regret, 4):>8}"
        )
    return out


def _render_aggregate(report: AnalysisReport) -> list[str]:
    agg = report.aggregate
    assert agg is not None
    c = report.cadence
    out = [
        "",
        f"Across {agg.n_runs} runs (mean ± sd; cadence {'matched' if c.matched else 'MISMATCHED'} "
        f"in {'all' if c.matched else 'some'} runs):",
        f"  {'metric':<18} {'runs':>4} {'pearson':>16} {'spearman':>16}  best lags (agreement)",
    ]
    for m in agg.metrics:
        lags = ",".join("-" if lag is None else _lag(lag) for lag in m.best_lags)
        out.append(
            f"  {m.metric:<18} {m.runs:>4} {_r(m.pearson_r_mean):>7} ± {num(m.pearson_r_sd, 3):<6}"
            f" {_r(m.spearman_r_mean):>7} ± {num(m.spearman_r_sd, 3):<6}  {lags} ({pct(m.lag_agreement)})"
        )
    out.append(
        f"  nowcast R² {_r(agg.nowcast_r2_mean)} ± {num(agg.nowcast_r2_sd, 3)} "
        f"(persistence {_r(agg.persistence_r2_mean)})"
    )
    for s in agg.early_stop:
        rule = "patience" if s["rule"] == "eval_patience" else s["rule"]
        out.append(
            f"  {s['signal']} {rule}: regret {num(s['regret_mean'], 4)} ± {num(s['regret_sd'], 4)},"
            f" {num(s['eval_calls_mean'], 1)} evals, fired in {s['stopped_runs']} of {s['runs']} runs"
        )
    return out
