"""One self-contained HTML report of a run log: monitor summary, audit, analysis and plots.

The file opens offline and travels as one attachment: the plot is inlined as a base64 PNG,
the style sheet is inline, and there is no script and no external reference. Each section
comes from the library function that owns it (`monitor`, `analysis.analyze`, `plot`);
this module only lays their results out. A section that cannot be computed (no eval loss
for the analysis, scipy absent) says why in its place instead of failing the report; the
plot cannot be left out, so a log without structural records is an error.

    from gradience.runlog.report_html import build_report

    result = build_report("runs/toy/run.jsonl", "runs/toy/report.html")
    print(result.out, result.sections)
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gradience import __version__
from gradience.errors import GradienceError, require
from gradience.mechanic.audit import audit
from gradience.preflight.check import check
from gradience.runlog._html import CSS, esc, g, kv, lag, num, pct, signed, table
from gradience.runlog._html import ul as list_
from gradience.runlog.monitor import monitor
from gradience.runlog.monitor_report import MonitorReport
from gradience.runlog.plot import (
    PLOT_METRICS,
    default_out,
    read_curves,
    render_png,
    result_of,
    write_output,
)
from gradience.runlog.report_sections import (
    adapter_beside,
    audit_tables,
    check_section,
    training_beside,
    trigger_section,
)


@dataclass(frozen=True)
class ReportResult:
    """A written report; `to_dict()` is the `--json` output."""

    path: str
    out: str
    bytes: int
    sections: tuple[str, ...]
    unavailable: dict[str, str]  # section -> why it could not be computed

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sections"] = list(self.sections)
        return out


def monitor_section(r: MonitorReport) -> str:
    """Status, latest eval signals, structural diagnostics, alerts and recommendations."""
    s, t = r.signals, r.train
    model, data = (r.run[k] if isinstance(r.run.get(k), dict) else {} for k in ("model", "dataset"))
    parts = ["<h2>Monitor</h2>", kv([
        ("Run", r.run_id or "?"), ("Status", f"{r.status} ({r.status_note})"),
        ("Model", model.get("name", "(not logged)")), ("Dataset", data.get("name", "(not logged)")),
        ("Profile", r.run.get("task_profile") or "(none)"),
        ("Steps", f"{num(r.last_step)} ({t.n_steps} train_step record{'' if t.n_steps == 1 else 's'})"),
    ])]  # fmt: skip
    split = (s.test_split or "test").capitalize()  # splits are labelled as the log names them
    parts += ["<h3>Latest eval signals</h3>", kv([
        ("Train PPL", num(s.train_ppl)), (f"{split} PPL", num(s.test_ppl)),
        ("Gap", f"{num(s.gap)}x" if s.gap is not None else "n/a"),
        ("Train Acc", pct(s.train_accuracy)), (f"{split} Acc", pct(s.test_accuracy)),
        *([(f"{split} exact match", pct(s.test_exact_match))] if s.test_exact_match is not None else []),
        (f"Best {split.lower()} loss", f"{num(s.best_test_loss, 4)} at step {num(s.best_test_loss_step)}"),
        ("Train loss (latest)", num(t.latest.get("loss"), 4)),
    ])]  # fmt: skip
    if r.structural is not None:
        st, m = r.structural, r.structural.latest.metrics
        parts += ["<h3>Structure (latest snapshot)</h3>", kv([
            ("Stable rank (mean)", num(m.get("stable_rank"))),
            ("Utilization (mean)", pct(m.get("utilization"))),
            ("Energy rank k@90% (mean)", num(m.get("energy_rank_90"), 1)),
            ("Adapter |dW|_F", g(m.get("frobenius_norm"))), ("sigma_max", g(m.get("sigma_max"))),
            ("Snapshots", f"{st.n_snapshots} (latest at step {st.latest.step}, reason "
                          f"{st.latest.reason}; {st.n_modules} modules)"),
        ])]  # fmt: skip
        parts.append(table(("metric", "latest", "slope / 100 steps", "relative change", "trend"), (
            (tr.metric, g(tr.latest), g(tr.slope_per_100_steps), pct(tr.relative_change), tr.label)
            for tr in st.trends
        )))  # fmt: skip
    else:
        parts.append('<p class="warn">No structural metrics in this log.</p>')
    parts.append(f"<h3>Alerts: {r.alerts.total}</h3>")
    parts.append(list_(f"step {a.step}: [{a.severity}] {a.code}: {a.message}" for a in r.alerts.latest))
    parts.append("<h3>Recommendations</h3>")
    parts.append(f'<p class="note">{esc(r.recommendation_note)}</p>')
    parts.append(list_([f"[{x.code}] {x.message} (rule: {x.rule}; value: {g(x.value)})"
                        for x in r.recommendations] or ["none fired"]))  # fmt: skip
    if r.missing:
        parts += ["<h3>Missing from this log</h3>", list_(r.missing)]
    if r.read_problems:
        parts += [f"<h3>Log problems ({r.skipped_lines} lines skipped)</h3>", list_(r.read_problems)]
    return "\n".join(parts)


def audit_section(r: MonitorReport) -> str:
    """The latest `lora_audit` record appended by `gradience audit --append`, if any."""
    if r.audit is None:
        return ""
    a = r.audit
    rows = [(k, num(v, 3)) for k, v in {**a.metrics, **a.suggestion}.items()
            if not isinstance(v, (dict, list))]  # fmt: skip
    at = f" at step {a.step}" if a.step is not None else ""
    head = f"<h2>Audit (appended{at}; adapter {esc(a.peft_dir or '?')})</h2>"
    return head + "\n" + table(("field", "value"), rows)


def analysis_section(path: str | os.PathLike[str], metrics: Sequence[str]) -> str:
    """Cadence, per-metric correlation and lead/lag, forecast and early stop of one run.

    Raises:
        GradienceError: the analysis cannot run on this log (no eval loss, scipy absent, ...).
    """
    from gradience.analysis import NOT_PREDICTION, analyze

    run = analyze([path], metrics).runs[0]
    c = run.cadence
    parts = ["<h2>Analysis: structure vs eval loss</h2>", kv([
        ("Target", f"eval loss on `{run.target_split}`"),
        ("Cadence", f"structural every {num(c.structural_every)} steps, eval every "
                    f"{num(c.eval_every)} steps; {c.matched_steps} of {c.eval_steps} eval steps "
                    "have a structural record at the same step"),
    ])]  # fmt: skip
    if not c.matched:
        parts.append('<p class="warn">Cadence mismatch: correlations use exactly matched steps '
                     "only and lead/lag is refused.</p>")  # fmt: skip
    parts.append(table(("metric", "n", "pearson", "spearman", "r(Δ)", "best lag"), (
        (p.metric, str(p.n), signed(p.pearson.r), signed(p.spearman.r),
         signed(p.pearson_differences.r),
         "refused" if p.lead_lag_refused else lag(p.best_lag))
        for p in run.pairs
    )))  # fmt: skip
    parts.append('<p class="note">Lag &gt; 0: structure leads eval loss; lags on first differences.</p>')
    f = run.forecast
    scores = [(name, sc) for name, sc in (("nowcast", f.nowcast), ("one step ahead", f.one_step)) if sc]
    parts.append("<h3>Ridge forecast of eval loss</h3>")
    parts.append(table(("horizon", "R²", "persistence R²", "held-out evals", "note"), (
        (name, signed(sc.r2), signed(sc.persistence_r2), str(sc.n_test), sc.reason or "")
        for name, sc in scores
    )) if scores else f'<p class="note">{esc(f.reason or "no forecast")}</p>')  # fmt: skip
    e = run.early_stop
    parts.append(f"<h3>Early-stop simulation (best eval loss {num(e.best_eval_loss, 4)} at step "
                 f"{num(e.best_step)})</h3>")  # fmt: skip
    parts.append(table(("signal", "rule", "stop step", "evals", "loss at stop", "regret"), (
        (o.signal, o.rule, f"n/a ({o.reason})" if o.stop_step is None
         else num(o.stop_step) + ("" if o.stopped else " (end)"),
         str(o.eval_calls), num(o.loss_at_stop, 4), num(o.regret, 4))
        for o in e.outcomes
    )))  # fmt: skip
    notes = [*run.notes, NOT_PREDICTION]
    return "\n".join([*parts, list_(notes, "note")])


def plot_section(png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<h2>Structure vs eval loss</h2>\n<figure><img alt="losses, structural metrics and per-layer heatmap against step" '
            f'src="data:image/png;base64,{b64}"><figcaption class="note">{esc(caption)}'
            "</figcaption></figure>")  # fmt: skip


def build_report(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    metrics: Sequence[str] = PLOT_METRICS,
) -> ReportResult:
    """Write one self-contained HTML report of a run log.

    Args:
        path: a `run.jsonl` written by Gradience telemetry.
        out: the HTML file to write (atomically); default: the log's name with `.html`.
        metrics: structural metrics to plot and analyse.

    Returns:
        `ReportResult`: the file written, its sections, and why any section is missing.

    Raises:
        UsageError: the log does not exist, or `out` is a folder.
        TelemetryError: the log is empty or has no structural records.
        MissingDependencyError: matplotlib is not installed (`pip install gradience[plot]`).

    Example:
        >>> build_report("runs/toy/run.jsonl", "runs/toy/report.html").sections  # doctest: +SKIP
        ('plots', 'monitor', 'audit', 'check', 'analysis')
    """
    require("matplotlib", "plot")
    report = monitor(path)
    curves = read_curves(path)
    png = render_png(curves, metrics)
    plot = result_of(curves, metrics, "(inline)", png)
    sections: list[str] = []
    unavailable: dict[str, str] = {}
    loss = (f"eval loss on `{plot.eval_split}` ({plot.n_evals} evals)"
            if plot.eval_split else "no eval loss logged")  # fmt: skip
    caption = (f"Top: train loss, {loss}, the gap shaded; then {', '.join(plot.metrics)}"
               + (f" and the per-layer {plot.heatmap_metric} heatmap" if plot.heatmap_metric else "")
               + f". {plot.n_triggers} trigger evals as vertical lines by reason, triggered evals ringed.")  # fmt: skip
    body = [plot_section(png, caption), monitor_section(report)]
    sections += ["plots", "monitor"]
    if report.triggers is not None:
        body.append(trigger_section(report.triggers))
        sections.append("triggers")
    adapter = adapter_beside(path)
    if adapter is not None:
        try:
            body.append(audit_tables(audit(adapter), str(adapter)))
            sections.append("audit")
        except GradienceError as exc:
            unavailable["audit"] = str(exc)
            body.append(f'<h2>Adapter audit</h2>\n<p class="warn">Not available: {esc(exc)}</p>')
    elif report.audit is not None:
        sections.append("audit")
        body.append(audit_section(report))
    task, training = report.run.get("task_profile"), training_beside(path)
    if adapter is not None and isinstance(task, str) and training is not None:
        try:
            body.append(check_section(check(task, adapter, training_dir=training)))
            sections.append("check")
        except GradienceError as exc:
            unavailable["check"] = str(exc)
    try:
        body.append(analysis_section(path, plot.metrics))
        sections.append("analysis")
    except GradienceError as exc:
        unavailable["analysis"] = str(exc)
        body.append(f'<h2>Analysis</h2>\n<p class="warn">Not available: {esc(exc)}</p>')
    document = _page(report, plot.title, "\n".join(body))
    data = document.encode("utf-8")
    target = write_output(out if out is not None else default_out(path, ".html"), data)
    return ReportResult(str(path), str(target), len(data), tuple(sections), unavailable)


def _page(r: MonitorReport, run_title: str, body: str) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"Gradience report: {run_title or r.run_id or r.path}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>{esc(title)}</h1>\n<p class=\"note\">Log: {esc(r.path)} · generated {when} "
            f"by gradience {__version__}</p>\n{body}\n</body></html>\n")  # fmt: skip
