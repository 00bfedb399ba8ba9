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
import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gradience import __version__
from gradience.errors import GradienceError, require
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

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:980px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em;border-bottom:2px solid #1f77b4;padding-bottom:.2em}
h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f6f8} td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{color:#a33;font-weight:600} .note{color:#555;font-size:.9em} img{max-width:100%}
"""


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


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return _esc(x)
    return f"{int(x)}" if float(x).is_integer() else f"{x:.{digits}f}"


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _lag(x: int | None) -> str:
    return "n/a" if x is None else (f"{x:+d}" if x else "0")


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows of already formatted cells; numbers-looking cells are right-aligned."""
    out = ["<table>" + ("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>" if head else "")]
    for row in rows:
        cells = "".join(
            f'<td class="n">{_esc(c)}</td>' if _numeric(c) else f"<td>{_esc(c)}</td>" for c in row
        )
        out.append(f"<tr>{cells}</tr>")
    return "\n".join([*out, "</table>"])


def _numeric(cell: Any) -> bool:
    return isinstance(cell, str) and cell.lstrip("+-").replace(".", "", 1).rstrip("%x").isdigit()


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    return _table((), ((k, v) for k, v in pairs))


def _list(items: Iterable[str], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    body = "".join(f"<li>{_esc(i)}</li>" for i in items)
    return f"<ul{attr}>{body}</ul>" if body else ""


def monitor_section(r: MonitorReport) -> str:
    """Status, latest eval signals, structural diagnostics, alerts and recommendations."""
    s, t = r.signals, r.train
    model, data = (r.run[k] if isinstance(r.run.get(k), dict) else {} for k in ("model", "dataset"))
    parts = ["<h2>Monitor</h2>", _kv([
        ("Run", r.run_id or "?"), ("Status", f"{r.status} ({r.status_note})"),
        ("Model", model.get("name", "(not logged)")), ("Dataset", data.get("name", "(not logged)")),
        ("Profile", r.run.get("task_profile") or "(none)"),
        ("Steps", f"{_num(r.last_step)} ({t.n_steps} train_step records)"),
    ])]  # fmt: skip
    split = (s.test_split or "test").capitalize()  # splits are labelled as the log names them
    parts += ["<h3>Latest eval signals</h3>", _kv([
        ("Train PPL", _num(s.train_ppl)), (f"{split} PPL", _num(s.test_ppl)),
        ("Gap", f"{_num(s.gap)}x" if s.gap is not None else "n/a"),
        ("Train Acc", _pct(s.train_accuracy)), (f"{split} Acc", _pct(s.test_accuracy)),
        *([(f"{split} exact match", _pct(s.test_exact_match))] if s.test_exact_match is not None else []),
        (f"Best {split.lower()} loss", f"{_num(s.best_test_loss, 4)} at step {_num(s.best_test_loss_step)}"),
        ("Train loss (latest)", _num(t.latest.get("loss"), 4)),
    ])]  # fmt: skip
    if r.structural is not None:
        st, m = r.structural, r.structural.latest.metrics
        parts += ["<h3>Structure (latest snapshot)</h3>", _kv([
            ("Stable rank (mean)", _num(m.get("stable_rank"))),
            ("Utilization (mean)", _pct(m.get("utilization"))),
            ("Energy rank k@90% (mean)", _num(m.get("energy_rank_90"), 1)),
            ("Adapter |dW|_F", _g(m.get("frobenius_norm"))), ("sigma_max", _g(m.get("sigma_max"))),
            ("Snapshots", f"{st.n_snapshots} (latest at step {st.latest.step}, reason "
                          f"{st.latest.reason}; {st.n_modules} modules)"),
        ])]  # fmt: skip
        parts.append(_table(("metric", "latest", "slope / 100 steps", "relative change", "trend"), (
            (tr.metric, _g(tr.latest), _g(tr.slope_per_100_steps), _pct(tr.relative_change), tr.label)
            for tr in st.trends
        )))  # fmt: skip
    else:
        parts.append('<p class="warn">No structural metrics in this log.</p>')
    parts.append(f"<h3>Alerts: {r.alerts.total}</h3>")
    parts.append(_list(f"step {a.step}: [{a.severity}] {a.code}: {a.message}" for a in r.alerts.latest))
    parts.append("<h3>Recommendations</h3>")
    parts.append(f'<p class="note">{_esc(r.recommendation_note)}</p>')
    parts.append(_list([f"[{x.code}] {x.message} (rule: {x.rule}; value: {_g(x.value)})"
                        for x in r.recommendations] or ["none fired"]))  # fmt: skip
    if r.missing:
        parts += ["<h3>Missing from this log</h3>", _list(r.missing)]
    if r.read_problems:
        parts += [f"<h3>Log problems ({r.skipped_lines} lines skipped)</h3>", _list(r.read_problems)]
    return "\n".join(parts)


def audit_section(r: MonitorReport) -> str:
    """The latest `lora_audit` record appended by `gradience audit --append`, if any."""
    if r.audit is None:
        return ""
    a = r.audit
    rows = [(k, _num(v, 3)) for k, v in {**a.metrics, **a.suggestion}.items()
            if not isinstance(v, (dict, list))]  # fmt: skip
    at = f" at step {a.step}" if a.step is not None else ""
    head = f"<h2>Audit (appended{at}; adapter {_esc(a.peft_dir or '?')})</h2>"
    return head + "\n" + _table(("field", "value"), rows)


def analysis_section(path: str | os.PathLike[str], metrics: Sequence[str]) -> str:
    """Cadence, per-metric correlation and lead/lag, forecast and early stop of one run.

    Raises:
        GradienceError: the analysis cannot run on this log (no eval loss, scipy absent, ...).
    """
    from gradience.analysis import NOT_PREDICTION, analyze

    run = analyze([path], metrics).runs[0]
    c = run.cadence
    parts = ["<h2>Analysis: structure vs eval loss</h2>", _kv([
        ("Target", f"eval loss on `{run.target_split}`"),
        ("Cadence", f"structural every {_num(c.structural_every)} steps, eval every "
                    f"{_num(c.eval_every)} steps; {c.matched_steps} of {c.eval_steps} eval steps "
                    "have a structural record at the same step"),
    ])]  # fmt: skip
    if not c.matched:
        parts.append('<p class="warn">Cadence mismatch: correlations use exactly matched steps '
                     "only and lead/lag is refused.</p>")  # fmt: skip
    parts.append(_table(("metric", "n", "pearson", "spearman", "r(Δ)", "best lag"), (
        (p.metric, str(p.n), _signed(p.pearson.r), _signed(p.spearman.r),
         _signed(p.pearson_differences.r),
         "refused" if p.lead_lag_refused else _lag(p.best_lag))
        for p in run.pairs
    )))  # fmt: skip
    parts.append('<p class="note">Lag &gt; 0: structure leads eval loss; lags on first differences.</p>')
    f = run.forecast
    scores = [(name, sc) for name, sc in (("nowcast", f.nowcast), ("one step ahead", f.one_step)) if sc]
    parts.append("<h3>Ridge forecast of eval loss</h3>")
    parts.append(_table(("horizon", "R²", "persistence R²", "held-out evals", "note"), (
        (name, _signed(sc.r2), _signed(sc.persistence_r2), str(sc.n_test), sc.reason or "")
        for name, sc in scores
    )) if scores else f'<p class="note">{_esc(f.reason or "no forecast")}</p>')  # fmt: skip
    e = run.early_stop
    parts.append(f"<h3>Early-stop simulation (best eval loss {_num(e.best_eval_loss, 4)} at step "
                 f"{_num(e.best_step)})</h3>")  # fmt: skip
    parts.append(_table(("signal", "rule", "stop step", "evals", "loss at stop", "regret"), (
        (o.signal, o.rule, f"n/a ({o.reason})" if o.stop_step is None
         else _num(o.stop_step) + ("" if o.stopped else " (end)"),
         str(o.eval_calls), _num(o.loss_at_stop, 4), _num(o.regret, 4))
        for o in e.outcomes
    )))  # fmt: skip
    notes = [*run.notes, NOT_PREDICTION]
    return "\n".join([*parts, _list(notes, "note")])


def plot_section(png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<h2>Plots</h2>\n<figure><img alt="structural metrics and eval loss against step" '
            f'src="data:image/png;base64,{b64}"><figcaption class="note">{_esc(caption)}'
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
        ('monitor', 'audit', 'analysis', 'plots')
    """
    require("matplotlib", "plot")
    report = monitor(path)
    curves = read_curves(path)
    png = render_png(curves, metrics)
    plot = result_of(curves, metrics, "(inline)", png)
    sections, unavailable = ["monitor"], {}
    body = [monitor_section(report)]
    if report.audit is not None:
        sections.append("audit")
        body.append(audit_section(report))
    try:
        body.append(analysis_section(path, plot.metrics))
        sections.append("analysis")
    except GradienceError as exc:
        unavailable["analysis"] = str(exc)
        body.append(f'<h2>Analysis</h2>\n<p class="warn">Not available: {_esc(exc)}</p>')
    loss = (f"eval loss on `{plot.eval_split}` (right axes, {plot.n_evals} evals)"
            if plot.eval_split else "no eval loss logged")  # fmt: skip
    caption = (f"{', '.join(plot.metrics)} (left axes); {loss}; {plot.n_triggers} trigger "
               "records (dotted lines), triggered evals ringed.")  # fmt: skip
    body.append(plot_section(png, caption))
    sections.append("plots")
    document = _page(report, "\n".join(body))
    data = document.encode("utf-8")
    target = write_output(out if out is not None else default_out(path, ".html"), data)
    return ReportResult(str(path), str(target), len(data), tuple(sections), unavailable)


def _page(r: MonitorReport, body: str) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"Gradience report: {r.run_id or r.path}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{_esc(title)}</h1>\n<p class=\"note\">Log: {_esc(r.path)} · generated {when} "
            f"by gradience {__version__}</p>\n{body}\n</body></html>\n")  # fmt: skip
