"""Run summary of a `run.jsonl`: what happened, how the run looks, what to check next.

One streaming pass over the log (`iter_records`) keeps running summaries, the latest eval of
each split and the last few structural snapshots, so a million-record log costs the memory
of a short one. Recommendations are hypotheses with their thresholds stated, not predictions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections import Counter, deque
from collections.abc import Sequence
from itertools import compress, repeat
from operator import contains
from typing import Any, cast

from gradience.errors import TelemetryError
from gradience.runlog.monitor_report import (
    CHANCE_MARGIN,
    CLASSIFIER_KINDS,
    EXACT_MATCH_KEYS,
    GAP_THRESHOLD,
    HYPOTHESIS_NOTE,
    LOSS_WINDOW,
    MAX_KEPT,
    OVERPROVISION_THRESHOLD,
    RUN_KEYS,
    STRUCTURAL_KEYS,
    STRUCTURAL_WINDOW,
    TEST_SPLITS,
    THRESHOLDS,
    TOKEN_ACCURACY_KEYS,
    TRAIN_KEYS,
    TRAINING_ARG_KEYS,
    Alert,
    Alerts,
    AuditBlock,
    Chance,
    MonitorReport,
    NonFinite,
    Recommendation,
    Signals,
    Snapshot,
    SplitEval,
    Structural,
    TrainSummary,
    json_ready,
    trend,
)
from gradience.runlog.train_fold import TrainFold, one_layout
from gradience.runlog.train_fold import finite_number as _num
from gradience.runlog.triggers import TriggerCollector
from gradience.telemetry import ReadProblems
from gradience.telemetry.chunks import Chunk, iter_record_chunks


def _str(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def _bump(counter: Counter[str], key: str) -> None:
    """Count `key`, holding at most MAX_KEPT distinct keys (a log could invent millions)."""
    if key in counter or len(counter) < MAX_KEPT:
        counter[key] += 1


def _ppl(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 700 else None


class _Summary:
    """Running state of one pass; only bounded pieces of the log are kept."""

    def __init__(self) -> None:
        self.n_records = self.n_resumes = self.n_alerts = self.nonfinite = 0
        self.n_snapshots = self.n_modules = 0
        self.costs: list[float] = []  # one float per snapshot: median and p95 need them all
        self.zero_modules: tuple[str, ...] = ()
        self.n_zero_modules = 0
        self.last_step: int | None = None
        self.first_nonfinite: int | None = None
        self.last_nonfinite: int | None = None
        self.start: dict[str, Any] | None = None
        self.end: tuple[str, int | None] | None = None
        self.audit: AuditBlock | None = None
        self.run_ids: dict[str, None] = {}  # an ordered set
        self.train = TrainFold(_ENVELOPE, MAX_KEPT, LOSS_WINDOW)
        self.evals: dict[str, SplitEval] = {}
        self.eval_latest: dict[str, tuple[int | None, int, dict[str, Any]]] = {}  # split -> (step, n, metrics)
        self.best_loss: dict[str, tuple[float, int | None]] = {}  # split -> (loss, step)
        self.recs: dict[str, tuple[Recommendation, int]] = {}  # code -> (latest, count)
        self.snapshots: deque[Snapshot] = deque(maxlen=STRUCTURAL_WINDOW)
        self.snapshot_latest: deque[tuple[int | None, dict[str, Any]]] = deque(maxlen=STRUCTURAL_WINDOW)
        self.alerts: deque[Alert] = deque(maxlen=MAX_KEPT)
        self.alert_codes: Counter[str] = Counter()
        self.alert_severities: Counter[str] = Counter()
        self.nonfinite_paths: Counter[str] = Counter()
        self.triggers = TriggerCollector()

    def add(self, data: dict[str, Any]) -> None:
        """Fold one record (a dict that passed the reader's envelope checks) into the summary."""
        self.n_records += 1
        step, event = data["step"], data["event"]
        self._note_ids((data["run_id"],))
        if step is not None and (self.last_step is None or step > self.last_step):
            self.last_step = step
        if "nonfinite" in data:
            self.nonfinite += 1
            if self.first_nonfinite is None:
                self.first_nonfinite = step
            self.last_nonfinite = step
            paths = data["nonfinite"]
            for path in paths if isinstance(paths, list) else []:
                _bump(self.nonfinite_paths, f"{event}:{path}")
        handler = _HANDLERS.get(event)
        if handler is not None:
            handler(self, step, data)
        if event != "train_step":  # the trigger summary reads metrics, run_start and run_end only
            self.triggers.add(data)

    def on_train_step(self, step: int | None, data: dict[str, Any]) -> None:
        self.train.add(step, data)

    def add_chunk(self, chunk: Chunk) -> None:
        """Fold consecutive records in order, runs of train steps a run at a time."""
        records, events, steps = chunk.records, chunk.events, chunk.steps
        self._note_ids(chunk.run_ids[:1] if chunk.one_run_id else chunk.run_ids)
        known = [x for x in steps if x is not None] if chunk.null_steps else cast("tuple[int, ...]", steps)
        top = max(known) if known else None
        if top is not None and (self.last_step is None or top > self.last_step):
            self.last_step = top
        start = 0
        for i in [*compress(range(len(events)), map("train_step".__ne__, events)), len(records)]:
            if i > start:
                self.add_train_batch(records[start:i], steps[start:i])
            if i < len(records):
                self.add(records[i])
            start = i + 1

    def _note_ids(self, run_ids: Sequence[str]) -> None:
        if len(self.run_ids) < MAX_KEPT:
            for run_id in dict.fromkeys(run_ids):
                if len(self.run_ids) >= MAX_KEPT:
                    break
                self.run_ids.setdefault(run_id)

    def add_train_batch(self, batch: list[dict[str, Any]], steps: Sequence[int | None]) -> None:
        """Fold consecutive train_step records, as `add` would one by one (`add_chunk` has
        already counted their run ids and steps, which `add` may count again: idempotent)."""
        uniform = one_layout(batch)
        if "nonfinite" in batch[-1] if uniform else any(map(contains, batch, repeat("nonfinite"))):
            for data in batch:  # rare: a NaN was logged; its paths are counted record by record
                self.add(data)
            return
        self.n_records += len(batch)
        self.train.add_batch(batch, steps, uniform)

    def on_eval(self, step: int | None, data: dict[str, Any]) -> None:
        split, metrics = data.get("split"), data.get("metrics")
        if not isinstance(split, str) or not isinstance(metrics, dict):
            return
        if split in self.eval_latest or len(self.eval_latest) < MAX_KEPT:
            seen = self.eval_latest.get(split)
            self.eval_latest[split] = (step, seen[1] + 1 if seen else 1, metrics)  # summarised in `finish`
        loss, best = _num(metrics.get("loss")), self.best_loss.get(split)
        if loss is not None and (best is None or loss < best[0]):
            self.best_loss[split] = (loss, step)

    def on_metrics(self, step: int | None, data: dict[str, Any]) -> None:
        agg, kind = data.get("metrics"), data.get("kind")
        if kind == "structural" and isinstance(agg, dict):
            self.snapshot_latest.append((step, data))  # summarised in `finish`
            self.n_snapshots += 1
            if (cost := _num(data.get("cost_ms"))) is not None:
                self.costs.append(cost)
        elif kind == "lora_audit":
            m, g = data.get("metrics"), data.get("suggestion")
            self.audit = AuditBlock(step, _str(data.get("peft_dir")),
                                    json_ready(m) if isinstance(m, dict) else {},
                                    json_ready(g) if isinstance(g, dict) else {})  # fmt: skip

    def finish(self) -> None:
        """Summarise what was kept raw during the pass: the latest eval of each split and
        the last structural snapshots (a long log has tens of thousands of each)."""
        self.evals = {split: _split_eval(split, step, n, json_ready(metrics))
                      for split, (step, n, metrics) in self.eval_latest.items()}  # fmt: skip
        for step, data in self.snapshot_latest:
            # Aggregates only: a snapshot's `modules` can hold hundreds of entries.
            agg = data["metrics"]
            metrics = {k: _num(agg.get(k)) for k in STRUCTURAL_KEYS}
            self.snapshots.append(Snapshot(step, _str(data.get("reason")), metrics))
        if self.snapshot_latest:
            data = self.snapshot_latest[-1][1]
            modules = data.get("modules")
            self.n_modules = len(modules) if isinstance(modules, dict) else 0
            zero = data.get("zero_modules")
            self.zero_modules = tuple(str(z) for z in zero[:MAX_KEPT]) if isinstance(zero, list) else ()
            n_zero = _num(data.get("n_zero_modules"))
            self.n_zero_modules = int(n_zero) if n_zero is not None else len(self.zero_modules)

    def on_alert(self, step: int | None, data: dict[str, Any]) -> None:
        code, severity = str(data.get("code", "?")), str(data.get("severity", "?"))
        self.n_alerts += 1
        self.alerts.append(Alert(step, severity, code, str(data.get("message", ""))))
        _bump(self.alert_codes, code)
        _bump(self.alert_severities, severity)

    def on_recommendation(self, step: int | None, data: dict[str, Any]) -> None:
        code = str(data.get("code", "?"))
        if code in self.recs or len(self.recs) < MAX_KEPT:
            got = Recommendation(code, str(data.get("message", "")), _num(data.get("threshold")),
                                 _num(data.get("value")), "recorded in the log", "log", step)  # fmt: skip
            self.recs[code] = (got, self.recs[code][1] + 1 if code in self.recs else 1)

    def on_lifecycle(self, step: int | None, data: dict[str, Any]) -> None:
        if data["event"] == "run_end":
            self.end = (str(data.get("status", "?")), step)
            return
        self.end = None  # a run that ended and was then resumed is running again
        if data["event"] == "run_start":
            self.start = data
        else:
            self.n_resumes += 1


_ENVELOPE = frozenset({"schema", "ts", "run_id", "seq", "event", "step", "nonfinite"})
_HANDLERS = {
    "train_step": _Summary.on_train_step, "eval": _Summary.on_eval, "metrics": _Summary.on_metrics,
    "alert": _Summary.on_alert, "recommendation": _Summary.on_recommendation,
    "run_start": _Summary.on_lifecycle, "run_resume": _Summary.on_lifecycle,
    "run_end": _Summary.on_lifecycle,
}  # fmt: skip


def _split_eval(split: str, step: int | None, n: int, metrics: dict[str, Any]) -> SplitEval:
    loss = _num(metrics.get("loss"))
    ppl, source = _num(metrics.get("ppl", metrics.get("perplexity"))), "logged"
    if ppl is None:
        ppl, source = _ppl(loss), "exp(loss)"
    accuracy = _num(metrics.get("accuracy", metrics.get("acc")))
    exact = next((v for k in EXACT_MATCH_KEYS if (v := _num(metrics.get(k))) is not None), None)
    tokens = next((v for k in TOKEN_ACCURACY_KEYS if (v := _num(metrics.get(k))) is not None), None)
    return SplitEval(split, step, n, loss, ppl, source if ppl is not None else None, accuracy,
                     metrics, exact, tokens)  # fmt: skip


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
    s = _Summary()
    for chunk in iter_record_chunks(path, problems=problems):
        s.add_chunk(chunk)
    s.finish()
    if s.n_records == 0:
        if len(problems) == 0:
            raise TelemetryError(f"{path}: the run log is empty; nothing to summarise")
        first = problems.messages()[0].removeprefix(f"{problems.path}: ")
        raise TelemetryError(f"{path}: no valid record ({len(problems)} lines skipped; {first})")
    return _report(s, str(path), problems)


def _report(s: _Summary, path: str, problems: ReadProblems) -> MonitorReport:
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


def _signals(s: _Summary, run: dict[str, Any]) -> Signals:
    test_split = next((name for name in TEST_SPLITS if name in s.evals), None)
    test = s.evals.get(test_split) if test_split else None
    train = s.evals.get("train")
    train_ppl, source = (train.ppl, "eval:train") if train else (None, None)
    if train_ppl is None and s.train.losses:  # no train-split eval: the training loss stands in
        train_ppl, source = _ppl(s.train.losses[-1][1]), "train_step"
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


def _structural(s: _Summary) -> Structural | None:
    if not s.snapshots:
        return None
    window = tuple(s.snapshots)
    trends = tuple(trend(k, [(sn.step, sn.metrics[k]) for sn in window]) for k in STRUCTURAL_KEYS)
    median = statistics.median(s.costs) if s.costs else None
    p95 = _percentile(s.costs, 95) if s.costs else None
    return Structural(s.n_snapshots, window[-1], s.n_modules, median, p95, window, trends,
                      s.zero_modules, s.n_zero_modules)  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


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


def _missing(s: _Summary) -> list[str]:
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
