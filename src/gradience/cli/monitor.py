"""`gradience monitor`: summarise a run log (`run.jsonl`) and say what to check next."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import add_log_argument, resolve_log
from gradience.cli._output import emit_json, header, human_count, num, pct
from gradience.runlog.monitor import monitor
from gradience.runlog.monitor_report import (
    CHANCE_MARGIN,
    FLAT_THRESHOLD,
    GAP_THRESHOLD,
    GENERATIVE_KINDS,
    OVERPROVISION_THRESHOLD,
    TRAIN_KEYS,
    MonitorReport,
    Trend,
)
from gradience.runlog.triggers import summary_lines

_LORA_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "lora_dropout",
              "rank_pattern", "alpha_pattern")  # fmt: skip
_LATEST_ALERTS = 3


def register(sub: Any) -> None:
    p = sub.add_parser(
        "monitor", help="summarise a run log: signals, diagnostics, recommendations",
        description="Summarise a run log (run.jsonl, or the run folder holding it): latest eval "
        "signals, diagnostics with their thresholds, trigger evals and their savings, and what to check next.",
    )
    add_log_argument(p)
    p.add_argument("--verbose", action="store_true", help="add trends, LoRA config, training args, all alerts, the audit")
    p.add_argument("--json", action="store_true", help="print the MonitorReport as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = monitor(resolve_log(args.run_jsonl))
    if args.json:
        emit_json(report)
    else:
        print("\n".join(render(report, verbose=args.verbose)))
    return 0


def render(r: MonitorReport, verbose: bool = False) -> list[str]:
    """The text report; `verbose` adds the config, trend tables, all alerts and the audit."""
    out = header("GRADIENCE MONITOR")
    out += [f"File: {r.path}", *_identity(r)]
    if verbose:
        out += _config(r)
    out += ["", "Latest eval signals:", *_signals(r)]
    if verbose and r.evals:
        out += ["", "Latest eval per split:"]
        for e in r.evals.values():
            out.append(f"  {e.split:<8} step {e.step}  loss={num(e.loss, 4)}  ppl={num(e.ppl)}"
                       f"  acc={pct(e.accuracy)}  ({e.n_evals} eval{'' if e.n_evals == 1 else 's'})")  # fmt: skip
    out += ["", "Diagnostics:", *_diagnostics(r)]
    if verbose and r.structural is not None:
        out += _trend_table(r)
    if r.triggers is not None:
        out += ["", *summary_lines(r.triggers, None if verbose else 10)]
    if r.audit is not None:
        out += _audit(r, verbose)
    out += _alerts(r, verbose)
    out += _recommendations(r)
    if r.missing:
        out += ["", "Missing from this log:"] + [f"  - {m}" for m in r.missing]
    if r.read_problems:
        plural = "line" if r.skipped_lines == 1 else "lines"
        out += ["", f"Log problems ({r.skipped_lines} {plural} skipped):"]
        out += [f"  - {m}" for m in r.read_problems]
    return out


def _identity(r: MonitorReport) -> list[str]:
    run = r.run
    model, data = _block(run, "model"), _block(run, "dataset")
    m = str(model.get("name", "(not logged)"))
    if isinstance(model.get("hub_id"), str) and model["hub_id"] != m:
        m += f" ({model['hub_id']})"
    if isinstance(model.get("n_params"), (int, float)):
        m += f" ({human_count(model['n_params'])} params"
        trainable = model.get("trainable_params")
        m += f", {human_count(trainable)} trainable)" if isinstance(trainable, (int, float)) else ")"
    d = data.get("name", "(not logged)")
    sizes = [f"{k[2:]} {data[k]}" for k in ("n_train", "n_test") if data.get(k) is not None]
    d += f" ({', '.join(sizes)})" if sizes else ""
    ids = r.run_id or "?"
    if len(r.run_ids) > 1:
        ids += f" ({len(r.run_ids)} run ids in this log)"
    t = r.train
    steps = f"Steps: {r.last_step if r.last_step is not None else 'n/a'}"
    steps += f" ({t.n_steps} train_step record{'' if t.n_steps == 1 else 's'}, steps {t.first_step}-{t.last_step})" if t.n_steps else " (no train_step records)"
    if r.n_resumes:
        steps += f"; resumed {r.n_resumes}x"
    return [
        f"Run: {ids}",
        f"Status: {r.status} ({r.status_note})",
        f"Model: {m}",
        f"Dataset: {d}",
        f"Profile: {run.get('task_profile') or '(none)'}",
        *_task_line(run),
        steps,
    ]


def _task_line(run: dict[str, Any]) -> list[str]:
    task = _block(run, "task")
    if not task:
        return []
    parts = [str(task.get("kind") or "unknown kind")]
    parts += [f"{k} {task[k]}" for k in ("peft_task_type", "model_class", "num_labels") if task.get(k) is not None]
    return [f"Task: {', '.join(parts)}"]


def _config(r: MonitorReport) -> list[str]:
    run, out = r.run, ["", "LoRA config:"]
    lora = _block(run, "lora")
    out += [f"  {k}: {lora[k]}" for k in _LORA_KEYS if k in lora] or ["  (not logged)"]
    out += ["", "Training args:"]
    out += [f"  {k}: {v}" for k, v in run["training_args"].items()] or ["  (not logged)"]
    interval = run.get("structural_interval")
    out.append(f"  eval_policy: {run.get('eval_policy') or 'n/a'}  structural_interval: "
               f"{interval if interval is not None else 'n/a'}")  # fmt: skip
    if versions := _block(run, "versions"):
        out.append("  versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return out


def _block(run: dict[str, Any], key: str) -> dict[str, Any]:
    value = run.get(key)
    return value if isinstance(value, dict) else {}


def _signals(r: MonitorReport) -> list[str]:
    s, out = r.signals, []
    train_note = {"eval:train": "", "train_step": " (from train_step loss; no train-split eval)"}
    split = s.test_split or "test"  # splits are labelled as the log names them
    generative = s.task_kind in GENERATIVE_KINDS
    ppl = "PPL (per token)" if generative else "PPL"
    if s.train_ppl is not None:
        out.append(f"  Train {ppl}: {num(s.train_ppl)}{train_note.get(s.train_ppl_source or '', '')}")
    else:
        out.append(f"  Train {ppl}: n/a")
    if generative and s.test_loss is not None:
        out.append(f"  {split.capitalize()} loss: {num(s.test_loss, 4)}")
    out.append(f"  {split.capitalize()} {ppl}: {num(s.test_ppl)}")
    out.append(f"  Gap: {num(s.gap)}x" if s.gap is not None else "  Gap: n/a")
    if s.test_exact_match is not None:
        out.append(f"  {split.capitalize()} exact match: {pct(s.test_exact_match)}")
    if s.test_token_accuracy is not None:
        out.append(f"  {split.capitalize()} token accuracy: {pct(s.test_token_accuracy)}")
    has_acc = s.train_accuracy is not None or s.test_accuracy is not None
    generated = generative or s.test_exact_match is not None or s.test_token_accuracy is not None
    if has_acc or not generated:  # a causal LM without an accuracy gets no "Acc: n/a" lines
        out.append(f"  Train Acc: {pct(s.train_accuracy)}")
        test_acc = f"  {split.capitalize()} Acc: {pct(s.test_accuracy)}"
        if s.chance is not None:
            test_acc += f" (chance {pct(s.chance.rate)}: {s.chance.detail})"
        out.append(test_acc)
    if s.best_test_loss is not None:
        out.append(f"  Best {split} loss: {num(s.best_test_loss, 4)} at step {s.best_test_loss_step}")
    t = r.train
    if t.latest.get("loss") is not None:
        line = f"  Train loss: {num(t.latest['loss'], 4)}"
        if t.loss_trend is not None and t.loss_trend.label != "n/a":
            line += f" ({_trend_words(t.loss_trend)} over the last {t.loss_trend.n_points} logs)"
        out.append(line)
    extra = {k: v for k, v in t.latest.items() if k not in TRAIN_KEYS and v is not None}
    if extra:  # what else the trainer logged (TRL: entropy, num_tokens, mean_token_accuracy)
        out.append("  Train (latest): " + ", ".join(f"{k}={_g(v)}" for k, v in extra.items()))
    return out


def _trend_words(t: Trend) -> str:
    rel = f", {t.relative_change:+.1%}" if t.relative_change is not None else ""
    return f"{t.label}: {t.slope_per_100_steps:+.4g} per 100 steps{rel}"


def _diagnostics(r: MonitorReport) -> list[str]:
    st = r.structural
    if st is None:
        if r.audit is None:
            return ["  No structural metrics in this log."]
        m = r.audit.metrics
        return ["  (from the appended audit; no structural metrics during training)",
                f"  Stable rank (mean): {num(m.get('stable_rank_mean'))}",
                f"  Utilization (mean): {pct(m.get('utilization_mean'))}"]  # fmt: skip
    m = st.latest.metrics
    cost = ""
    if st.cost_ms_median is not None:
        cost = f"; cost median {num(st.cost_ms_median, 1)} ms, p95 {num(st.cost_ms_p95, 1)} ms"
    trends = ", ".join(f"{t.metric} {t.label}" for t in st.trends)
    zero = []
    if st.n_zero_modules:
        names = ", ".join(st.zero_modules[:5]) + (" ..." if st.n_zero_modules > 5 else "")
        zero = [f"  Zero modules: {st.n_zero_modules} of {st.n_modules} (update exactly 0; left out of the "
                f"means): {names}"]
    return [*zero,
        f"  Stable rank (mean): {num(m['stable_rank'])}",
        f"  Utilization (mean): {pct(m['utilization'])}",
        f"  Energy rank k@90% (mean): {num(m['energy_rank_90'], 1)}",
        f"  Adapter norm: |dW|_F={_g(m['frobenius_norm'])} sigma_max={_g(m['sigma_max'])}",
        f"  Snapshots: {st.n_snapshots} (latest at step {st.latest.step}, reason {st.latest.reason};"
        f" {st.n_modules} modules{cost})",
        f"  Trend over the last {len(st.window)} snapshots (flat when |relative change| < "
        f"{FLAT_THRESHOLD:.0%}): {trends}",
    ]


def _trend_table(r: MonitorReport) -> list[str]:
    assert r.structural is not None
    st = r.structural
    out = ["", f"Structural trend (last {len(st.window)} snapshots; slope per 100 steps; "
           f"flat when |relative change| < {FLAT_THRESHOLD:.0%}):",
           f"  {'metric':<16}{'latest':>10}{'slope/100':>12}{'rel.change':>12}  label"]  # fmt: skip
    for t in st.trends:
        slope = f"{t.slope_per_100_steps:+.4g}" if t.slope_per_100_steps is not None else "n/a"
        rel = f"{t.relative_change:+.1%}" if t.relative_change is not None else "n/a"
        out.append(f"  {t.metric:<16}{_g(t.latest):>10}{slope:>12}{rel:>12}  {t.label}")
    out.append(f"  {'step':>8} {'reason':<9}" + "".join(f"{k:>16}" for k in st.latest.metrics))
    for sn in st.window:
        vals = "".join(f"{_g(v):>16}" for v in sn.metrics.values())
        out.append(f"  {sn.step if sn.step is not None else '-':>8} {sn.reason or '-':<9}{vals}")
    return out


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _audit(r: MonitorReport, verbose: bool) -> list[str]:
    assert r.audit is not None
    a, m, g = r.audit, r.audit.metrics, r.audit.suggestion
    out = ["", f"Audit (appended; adapter {a.peft_dir or '?'}):"]
    out.append(f"  Utilization (mean): {pct(m.get('utilization_mean'))}  Stable rank (mean): "
               f"{num(m.get('stable_rank_mean'))}  suggested r: {g.get('uniform_median', '?')} "
               f"(typical) / {g.get('uniform_p90', '?')} (conservative)")  # fmt: skip
    if verbose:
        out += [f"  {k}: {v}" for k, v in {**m, **g}.items()]
    return out


def _alerts(r: MonitorReport, verbose: bool) -> list[str]:
    al = r.alerts
    if not al.total:
        return ["", "Alerts: none"]
    codes = ", ".join(f"{c}: {n}" for c, n in sorted(al.by_code.items(), key=lambda x: -x[1]))
    out = ["", f"Alerts: {al.total} ({codes})"]
    shown = al.latest if verbose else al.latest[-_LATEST_ALERTS:]
    if len(shown) < al.total:
        out.append(f"  latest {len(shown)}:")
    out += [f"  step {a.step}: [{a.severity}] {a.code}: {a.message}" for a in shown]
    return out


def _recommendations(r: MonitorReport) -> list[str]:
    out = ["", "Recommendations (hypotheses to verify on held-out data, not predictions):"]
    if not r.recommendations:
        out.append(
            f"  none fired (rules: gap > {GAP_THRESHOLD}x; a classifier's test accuracy <= chance + "
            f"{CHANCE_MARGIN:.0%} points; mean energy_rank_90 / r < {OVERPROVISION_THRESHOLD:.0%}; "
            "any non-finite value)"
        )
    for rec in r.recommendations:
        if rec.source == "log":
            at = f" at step {rec.step}" if rec.step is not None else ""
            out.append(f"  - [{rec.code}] {rec.message} (recorded in the log{at})")
        else:
            value = _g(rec.value)
            out.append(f"  - [{rec.code}] {rec.message}")
            out.append(f"      rule: {rec.rule}; value: {value}")
    return out
