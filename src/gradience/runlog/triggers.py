"""What trigger-based eval did in a run: each trigger, and the evals and seconds it saved.

Read from the log alone: the `metrics` records of kind `eval_trigger` (one per trigger: step,
reason, detail) and the `eval_savings` block of `run_end`, which counts savings against the
schedule the user configured (`reference_source` says which: the Trainer's `eval_steps`, an
explicit `reference_eval_every`, or, with no schedule configured, the trigger's `min_spacing`).
`TriggerCollector` folds records one at a time, so `monitor` feeds it from its own pass.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from gradience.integrations.trigger import TRIGGER_KIND, TRIGGER_REASONS
from gradience.telemetry import ReadProblems, iter_record_data

__all__ = ["MAX_LISTED", "TriggerCollector", "TriggerEvent", "TriggerSummary", "read_triggers"]

MAX_LISTED = 200  # triggers kept in the list (counts cover all); a long run could log thousands
_SAVINGS_KEYS = ("evals_run", "eval_seconds", "mean_eval_seconds", "reference_eval_every", "reference_source",
                 "reference_evals", "evals_saved", "eval_seconds_saved")  # fmt: skip


@dataclass(frozen=True)
class TriggerEvent:
    """One trigger: the eval step it caused, why, and the numbers behind it."""

    step: int
    reason: str
    detail: str
    detected_step: int | None = None  # when the trigger was seen (earlier if min_spacing deferred it)
    also: tuple[str, ...] = ()  # other pending reasons the same eval answered


@dataclass(frozen=True)
class TriggerSummary:
    """The triggers of a run and its savings (None fields: the run has not ended)."""

    n_triggers: int
    by_reason: dict[str, int]
    triggers: tuple[TriggerEvent, ...]  # the first MAX_LISTED
    evals_run: int | None = None
    eval_seconds: float | None = None
    mean_eval_seconds: float | None = None
    reference_eval_every: int | None = None
    reference_source: str | None = None  # eval_steps | reference_eval_every | min_spacing
    reference_evals: int | None = None
    evals_saved: int | None = None
    eval_seconds_saved: float | None = None
    fraction_saved: float | None = None  # evals_saved / reference_evals

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["triggers"] = [dataclasses.asdict(t) | {"also": list(t.also)} for t in self.triggers]
        return out


class TriggerCollector:
    """Fold run-log records (dicts) into a `TriggerSummary`; `result()` is None for a run
    without trigger eval."""

    def __init__(self) -> None:
        self.events: list[TriggerEvent] = []
        self.n = 0
        self.by_reason: dict[str, int] = {}
        self.savings: dict[str, Any] | None = None

    def add(self, data: dict[str, Any]) -> None:
        event = data.get("event")
        if event == "metrics" and data.get("kind") == TRIGGER_KIND and isinstance(data.get("step"), int):
            reason = str(data.get("reason") or "unspecified")
            self.n += 1
            if reason in self.by_reason or len(self.by_reason) < len(TRIGGER_REASONS) + 10:
                self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            if len(self.events) < MAX_LISTED:
                also = data.get("also")
                detected = data.get("detected_step")
                self.events.append(TriggerEvent(
                    data["step"], reason, str(data.get("detail", "")),
                    detected if isinstance(detected, int) else None,
                    tuple(str(a) for a in also) if isinstance(also, list) else (),
                ))  # fmt: skip
        elif event == "run_end" and isinstance(data.get("eval_savings"), dict):
            self.savings = data["eval_savings"]
        elif event == "run_start":
            self.savings = None  # a fresh run in the same file starts over

    def result(self) -> TriggerSummary | None:
        if self.n == 0 and self.savings is None:
            return None
        saved = {k: self.savings.get(k) for k in _SAVINGS_KEYS} if self.savings else {}
        ref, n_saved = saved.get("reference_evals"), saved.get("evals_saved")
        fraction = n_saved / ref if isinstance(ref, int) and ref > 0 and isinstance(n_saved, int) else None
        return TriggerSummary(self.n, dict(self.by_reason), tuple(self.events), **saved, fraction_saved=fraction)


def read_triggers(path: str | os.PathLike[str]) -> TriggerSummary | None:
    """The `TriggerSummary` of a run log, or None when it used no trigger eval.

    Example:
        >>> s = read_triggers("runs/toy/run.jsonl")  # doctest: +SKIP
        >>> s.evals_saved, s.reference_source  # doctest: +SKIP
        (5, 'eval_steps')
    """
    collector = TriggerCollector()
    for _, data in iter_record_data(path, problems=ReadProblems(path)):
        collector.add(data)
    return collector.result()


def savings_line(s: TriggerSummary) -> str:
    """One sentence: evals run against the configured schedule, and the seconds saved."""
    if s.reference_evals is None or s.evals_run is None:
        return "savings: n/a (no run_end record yet)"
    against = {"eval_steps": "the configured eval_steps", "reference_eval_every": "reference_eval_every",
               "min_spacing": "no configured schedule; the trigger's min_spacing"}.get(
        str(s.reference_source), str(s.reference_source))  # fmt: skip
    pct = f" ({100 * s.fraction_saved:.0f}% of evals)" if s.fraction_saved is not None else ""
    secs = (f", ~{s.eval_seconds_saved:.1f} s of eval saved at {s.mean_eval_seconds:.2f} s per eval"
            if s.eval_seconds_saved is not None and s.mean_eval_seconds is not None else "")  # fmt: skip
    evals = f"{s.evals_run} eval{'' if s.evals_run == 1 else 's'}"
    return (f"{evals} instead of {s.reference_evals} (every {s.reference_eval_every} steps: "
            f"{against}): {s.evals_saved} saved{pct}{secs}")  # fmt: skip


def summary_lines(s: TriggerSummary, limit: int | None = 10) -> list[str]:
    """The text block `gradience monitor` prints: savings, counts by reason, then each trigger."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.by_reason.items(), key=lambda kv: -kv[1]))
    out = [f"Trigger eval: {s.n_triggers} trigger{'' if s.n_triggers == 1 else 's'}"
           + (f" ({reasons})" if reasons else ""), f"  {savings_line(s)}"]  # fmt: skip
    shown = s.triggers if limit is None else s.triggers[-limit:]
    if len(shown) < s.n_triggers:
        out.append(f"  (latest {len(shown)} of {s.n_triggers} shown; --verbose for up to {MAX_LISTED})")
    for t in shown:
        seen = f", seen at {t.detected_step}" if t.detected_step is not None and t.detected_step != t.step else ""
        also = f" (+{', '.join(t.also)})" if t.also else ""
        out.append(f"  step {t.step:>6}  {t.reason:<14}{also} {t.detail}{seen}")
    return out
