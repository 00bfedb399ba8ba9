"""The running state of one pass over a run log: what `monitor` folds each record into.

Only bounded pieces of the log are kept (the latest eval of each split, the last few
snapshots, capped counters), so a million-record log costs the memory of a short one.
Records arrive in chunks from `telemetry.chunks`; runs of train steps are folded a batch at
a time by `TrainFold`, everything else one record at a time by `Summary.add`, the rule.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from itertools import compress, repeat
from operator import contains
from typing import Any, cast

from gradience.runlog.monitor_report import (
    EXACT_MATCH_KEYS,
    LOSS_WINDOW,
    MAX_KEPT,
    STRUCTURAL_KEYS,
    STRUCTURAL_WINDOW,
    TOKEN_ACCURACY_KEYS,
    Alert,
    AuditBlock,
    Recommendation,
    Snapshot,
    SplitEval,
    json_ready,
)
from gradience.runlog.train_fold import TrainFold, one_layout
from gradience.runlog.train_fold import finite_number as _num
from gradience.runlog.triggers import TriggerCollector
from gradience.telemetry.chunks import Chunk


def _str(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def _bump(counter: Counter[str], key: str) -> None:
    """Count `key`, holding at most MAX_KEPT distinct keys (a log could invent millions)."""
    if key in counter or len(counter) < MAX_KEPT:
        counter[key] += 1


def perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 700 else None


class Summary:
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
    "train_step": Summary.on_train_step, "eval": Summary.on_eval, "metrics": Summary.on_metrics,
    "alert": Summary.on_alert, "recommendation": Summary.on_recommendation,
    "run_start": Summary.on_lifecycle, "run_resume": Summary.on_lifecycle,
    "run_end": Summary.on_lifecycle,
}  # fmt: skip


def _split_eval(split: str, step: int | None, n: int, metrics: dict[str, Any]) -> SplitEval:
    loss = _num(metrics.get("loss"))
    ppl, source = _num(metrics.get("ppl", metrics.get("perplexity"))), "logged"
    if ppl is None:
        ppl, source = perplexity(loss), "exp(loss)"
    accuracy = _num(metrics.get("accuracy", metrics.get("acc")))
    exact = next((v for k in EXACT_MATCH_KEYS if (v := _num(metrics.get(k))) is not None), None)
    tokens = next((v for k in TOKEN_ACCURACY_KEYS if (v := _num(metrics.get(k))) is not None), None)
    return SplitEval(split, step, n, loss, ppl, source if ppl is not None else None, accuracy,
                     metrics, exact, tokens)  # fmt: skip
