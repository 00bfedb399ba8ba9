"""Run summary of a `run.jsonl`: what happened, how the run looks, what to check next.

One streaming pass over the log (`telemetry.chunks`, folded into a `runlog.summary.Summary`)
keeps running summaries, the latest eval of each split and the last few structural
snapshots, so a million-record log costs the memory of a short one. Recommendations are
hypotheses with their thresholds stated, not predictions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from gradience._quantile import median, percentile
from gradience.errors import TelemetryError
from gradience.runlog.monitor_report import (
    CHANCE_MARGIN,
    CLASSIFIER_KINDS,
    GAP_THRESHOLD,
    HYPOTHESIS_NOTE,
    OVERPROVISION_THRESHOLD,
    RUN_KEYS,
    STRUCTURAL_KEYS,
    TEST_SPLITS,
    THRESHOLDS,
    TRAIN_KEYS,
    TRAINING_ARG_KEYS,
    Alerts,
    AuditBlock,
    Chance,
    MonitorReport,
    NonFinite,
    Recommendation,
    Signals,
    SplitEval,
    Structural,
    TrainSummary,
    json_ready,
    trend,
)
from gradience.runlog.summary import Summary, perplexity
from gradience.runlog.train_fold import finite_number as _num
from gradience.telemetry import ReadProblems
from gradience.telemetry.chunks import iter_record_chunks


def monitor(path: str | os.PathLike[str]) -> MonitorReport:
    """Summarise a run log in one streaming pass: status, signals, diagnostics, advice.

    Args:
        path: a `run.jsonl` written by `RunWriter` / the Gradience callback.

    Returns:
        A `MonitorReport`; missing pieces (no run_end, no train_step, ...) are listed in
        `missing`, and skipped lines in `read_problems` with their line numbers.

    Raises:
        UsageError: `path` does not exist or is not a file.
        TelemetryError: the log is empty or holds no valid record.

    Example:
        >>> report = monitor("runs/toy/run.jsonl")  # doctest: +SKIP
        >>> report.signals.gap, [r.code for r in report.recommendations]  # doctest: +SKIP
    """
    problems = ReadProblems(path)
    s = Summary()
    for chunk in iter_record_chunks(path, problems=problems):
        s.add_chunk(chunk)
    s.finish()
    if s.n_records == 0:
        if len(problems) == 0:
            raise TelemetryError(f"{path}: the run log is empty; nothing to summarise")
        first = problems.messages()[0].removeprefix(f"{problems.path}: ")
        raise TelemetryError(f"{path}: no valid record ({len(problems)} lines skipped; {first})")
    return _report(s, str(path), problems)


def _report(s: Summary, path: str, problems: ReadProblems) -> MonitorReport:
    run = _run(s.start)
    signals = _signals(s, run)
    structural = _structural(s)
    nonfinite = NonFinite(s.nonfinite, s.first_nonfinite, s.last_nonfinite,
                          dict(s.nonfinite_paths))  # fmt: skip
    lora = run.get("lora")
    r = _num(lora.get("r")) if isinstance(lora, dict) else None
    recs = _recommend(signals, structural, s.audit, nonfinite, int(r) if r is not None else None)
    for rec, n in s.recs.values():
        recs.append(dataclasses.replace(rec, rule=f"{rec.rule} ({n} times, latest shown)")
                    if n > 1 else rec)  # fmt: skip
    if s.end is not None:
        status, note = s.end[0], f"run_end at step {s.end[1]}"
    else:
        status = "incomplete"
        note = f"no run_end record: still running or crashed; last step seen {s.last_step}"
    t = s.train
    latest = {k: t.latest.get(k) for k in TRAIN_KEYS}
    latest.update({k: v for k, v in t.latest.items() if k not in latest})
    train = TrainSummary(t.n, t.first_step, t.last_step, latest, *t.min_loss,
                         trend("loss", list(t.losses)) if t.losses else None)  # fmt: skip
    prefix = f"{problems.path}: "
    return MonitorReport(
        path=path, run_id=next(reversed(s.run_ids), None), run_ids=tuple(s.run_ids),
        status=status, status_note=note, n_records=s.n_records, last_step=s.last_step,
        n_resumes=s.n_resumes, run=run, train=train, evals=dict(s.evals), signals=signals, structural=structural, audit=s.audit,
        alerts=Alerts(s.n_alerts, dict(s.alert_codes), dict(s.alert_severities), tuple(s.alerts)),
        nonfinite=nonfinite, recommendations=tuple(recs), recommendation_note=HYPOTHESIS_NOTE,
        thresholds=THRESHOLDS, missing=tuple(_missing(s)), skipped_lines=len(problems),
        read_problems=tuple(m.removeprefix(prefix) for m in problems.messages()),
        triggers=s.triggers.result(),
    )  # fmt: skip


def _run(start: dict[str, Any] | None) -> dict[str, Any]:
    d = start or {}
    args: dict[str, Any] = d.get("training_args") or {}
    args = args if isinstance(args, dict) else {}
    run = {k: json_ready(d.get(k)) for k in RUN_KEYS}
    shown = {k: args[k] for k in TRAINING_ARG_KEYS if k in args}
    max_steps = _num(shown.get("max_steps"))
    if max_steps is not None and max_steps > 0:
        shown.pop("num_train_epochs", None)  # the Trainer ignores it when max_steps > 0
    elif "max_steps" in shown:
        shown.pop("max_steps")  # -1: epochs decide
    run["training_args"] = json_ready(shown)
    return run


def _task_kind(run: dict[str, Any]) -> str | None:
    task = run.get("task")
    kind = task.get("kind") if isinstance(task, dict) else None
    return kind if isinstance(kind, str) else None


def _signals(s: Summary, run: dict[str, Any]) -> Signals:
    test_split = next((name for name in TEST_SPLITS if name in s.evals), None)
    test = s.evals.get(test_split) if test_split else None
    train = s.evals.get("train")
    train_ppl, source = (train.ppl, "eval:train") if train else (None, None)
    if train_ppl is None and s.train.losses:  # no train-split eval: the training loss stands in
        train_ppl, source = perplexity(s.train.losses[-1][1]), "train_step"
    test_ppl = test.ppl if test else None
    best = s.best_loss.get(test_split or "", (None, None))
    kind = _task_kind(run)
    return Signals(
        train_ppl=train_ppl, train_ppl_source=source if train_ppl is not None else None,
        train_accuracy=train.accuracy if train else None, test_split=test_split,
        test_ppl=test_ppl, test_accuracy=test.accuracy if test else None,
        gap=test_ppl / train_ppl if test_ppl is not None and train_ppl else None,
        best_test_loss=best[0], best_test_loss_step=best[1],
        chance=_chance(run, test, kind) if test is not None and test.accuracy is not None else None,
        task_kind=kind, test_loss=test.loss if test else None,
        test_exact_match=test.exact_match if test else None,
        test_token_accuracy=test.token_accuracy if test else None,
    )  # fmt: skip


def _chance(run: dict[str, Any], test: SplitEval, kind: str | None) -> Chance | None:
    """A classifier's chance level: the logged majority-class rate, else 1/num_labels.

    None unless the run is a classifier (task kind, or an older log that gives num_labels)
    with a known label count: a causal LM's accuracy is exact match or token accuracy, which
    has no chance level, and guessing "binary" for an unknown classifier misleads.
    """
    if kind is not None and kind not in CLASSIFIER_KINDS:
        return None
    blocks = [run.get(k) for k in ("task", "dataset", "model")]
    labels = [n for b in blocks if isinstance(b, dict) and (n := _num(b.get("num_labels"))) is not None and n >= 2]
    if not labels:
        return None
    n = labels[0]
    dataset = run["dataset"] if isinstance(run["dataset"], dict) else {}
    for where, block in (("test eval", test.metrics), ("dataset", dataset)):
        majority = _num(block.get("majority_rate"))
        if majority is not None and 0 < majority < 1:
            return Chance(majority, "majority_rate", f"majority-class rate from the {where}, num_labels={n:g}")
    return Chance(1.0 / n, "num_labels", f"1/num_labels, num_labels={n:g}")


def _structural(s: Summary) -> Structural | None:
    if not s.snapshots:
        return None
    window = tuple(s.snapshots)
    trends = tuple(trend(k, [(sn.step, sn.metrics[k]) for sn in window]) for k in STRUCTURAL_KEYS)
    median_cost = median(s.costs) if s.costs else None
    p95 = percentile(s.costs, 95) if s.costs else None
    return Structural(s.n_snapshots, window[-1], s.n_modules, median_cost, p95, window, trends,
                      s.zero_modules, s.n_zero_modules)  # fmt: skip


def _recommend(
    sig: Signals, st: Structural | None, audit: AuditBlock | None, nf: NonFinite, r: int | None = None
) -> list[Recommendation]:
    out: list[Recommendation] = []
    if sig.gap is not None and sig.gap > GAP_THRESHOLD:
        out.append(Recommendation(
            "memorizing", f"Gap {sig.gap:.2f}x > {GAP_THRESHOLD}x: probably memorizing; try "
            "fewer steps, more data or more regularisation, and watch the test loss",
            GAP_THRESHOLD, sig.gap, f"gap = test ppl / train ppl > {GAP_THRESHOLD}x", "monitor"))  # fmt: skip
    acc, chance = sig.test_accuracy, sig.chance
    if acc is not None and chance is not None and acc <= chance.rate + CHANCE_MARGIN:
        out.append(Recommendation(
            "near_chance", f"Test accuracy {acc:.1%} is within {100 * CHANCE_MARGIN:g} points of "
            f"chance ({chance.rate:.1%}, {chance.detail}): fix the task set-up first (labels, "
            "preprocessing, eval split) before tuning LoRA", chance.rate + CHANCE_MARGIN, acc,
            f"test accuracy <= chance + {100 * CHANCE_MARGIN:g} points", "monitor"))  # fmt: skip
    out += _overprovisioned(st, audit, r)
    if nf.records:
        out.append(Recommendation(
            "nonfinite_values", f"{nf.records} record(s) held NaN/Inf values, written as null "
            f"(first at step {nf.first_step}: {', '.join(list(nf.by_path)[:3])}); check the "
            "learning rate, precision and gradient clipping", 0.0, float(nf.records),
            "any non-finite value in the log", "monitor"))  # fmt: skip
    return out


def _overprovisioned(st: Structural | None, audit: AuditBlock | None, r: int | None) -> list[Recommendation]:
    """Mean energy_rank_90 / r < OVERPROVISION_THRESHOLD: a smaller rank probably keeps 90% of the energy."""
    energy, where = (st.latest.metrics["energy_rank_90"], "latest structural snapshot") if st else (None, "")
    if energy is None and audit is not None:
        energy, where = _num(audit.metrics.get("energy_rank_p50")), "appended audit, median"
    if energy is None or r is None or r < 2:
        return []
    fraction = energy / r
    if fraction >= OVERPROVISION_THRESHOLD:
        return []
    k = 1 << max(0, math.ceil(math.log2(max(energy, 1.0))))  # rounded up to a power of two
    rule = f"mean energy_rank_90 / r < {OVERPROVISION_THRESHOLD:.0%}"
    return [Recommendation(
        "rank_overprovisioned", f"90% of the update's energy sits in {energy:.1f} of r={r} directions "
        f"(mean energy_rank_90, {where}): r={k} is the hypothesis to test before the next run: "
        f"`gradience compress ADAPTER --rank {k} --out-dir SMALLER --verify-cmd \"YOUR_EVAL {{adapter}}\"` "
        "scores your eval on both", OVERPROVISION_THRESHOLD, fraction, rule, "monitor")]  # fmt: skip


def _missing(s: Summary) -> list[str]:
    has_test = any(name in s.evals for name in TEST_SPLITS)
    checks = [
        (s.start is None, "run_start: no model, dataset or LoRA config"),
        (not s.train.n, "train_step: no training loss (an eval-only log?)"),
        (not s.evals, "eval: no eval metrics"),
        (bool(s.evals) and "train" not in s.evals,
         "train-split eval: train ppl falls back to the train_step loss"),
        (bool(s.evals) and not has_test,
         f"test-split eval (one of {', '.join(TEST_SPLITS)}): no test signals"),
        (not s.n_snapshots, "structural metrics: no adapter diagnostics during training"),
        (s.end is None, "run_end: the run is still running or crashed"),
    ]  # fmt: skip
    return [message for missing, message in checks if missing]
