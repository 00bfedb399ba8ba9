"""Trigger-based eval: evaluate when the adapter's structure says something happened.

A fixed schedule pays for an eval every N steps whether or not anything changed. The
adapter's structure is measured every few steps anyway (a snapshot costs a fraction of a
step), so `GradienceCallback(eval_policy="trigger")` reads that series and asks for an eval
only when it moves in a way worth checking:

- `plateau_entry`: the structure stopped moving: the fitted relative slope of `metric`
  (`frobenius_norm`) over the last `window` snapshots fell below `plateau_rel_slope` per
  step. Fires once on entering a plateau, not on every point of it. (Not the same rule as
  `analyze`'s early-stop `plateau`, which fits the change across a window of matched eval
  points and waits `plateau_patience` points: hence the distinct name.)
- `divergence`: the latest rate of change of a structural metric is a `z_threshold`-sigma
  outlier against its previous `2 * window` rates (twice the slope's window: a spread
  estimated from a handful of rates would make false alarms common).
- `nonfinite`: a structural value is NaN or infinite (once per onset).
- `regime_change`: the fitted slope of `metric` changed sign, or the structure started
  moving again after a plateau. A sharp change of the slope is a jump of the rate, which
  `divergence` catches; a slope that decays as the learning rate does is the normal course
  and never fires (its end point is the plateau).
- `max_spacing`: nothing fired for `max_spacing` steps: the budget's ceiling.
- `final`: the last step, so a run always ends with a comparable eval.

`min_spacing` is the budget's floor. A trigger detected sooner after the last eval waits,
pending, and fires at the first step the floor allows, reported with the step it was
detected at. Only `final` ignores the floor. Any eval answers every trigger pending at it,
whoever asked for it.

`TriggerPolicy` and `TriggerState` are the decision alone: numbers in, decisions out, no
torch, so they are tested on synthetic series. `TrainerTrigger` is the glue the Trainer
callback uses: it sets `control.should_evaluate`, writes one `metrics` record of kind
`eval_trigger` per trigger, and sums up eval counts and seconds for `run_end`.

Example:
    >>> state = TriggerState(TriggerPolicy(window=3, min_spacing=2, max_spacing=100))
    >>> for step, norm in enumerate([1.0, 2.0, 3.0, 3.0, 3.0, 3.0], start=1):
    ...     _ = state.observe(step, {"frobenius_norm": norm})
    ...     decision = state.decide(step)
    ...     if decision.evaluate:
    ...         print(step, decision.reason)
    5 plateau_entry
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gradience.analysis.early_stop import relative_change
from gradience.errors import UsageError

TRIGGER_KIND = "eval_trigger"

NONFINITE = "nonfinite"
DIVERGENCE = "divergence"
REGIME_CHANGE = "regime_change"
PLATEAU = "plateau_entry"
MAX_SPACING = "max_spacing"
FINAL = "final"
# Most urgent first: when several triggers are pending, the eval is reported under the first.
TRIGGER_REASONS: tuple[str, ...] = (NONFINITE, DIVERGENCE, REGIME_CHANGE, PLATEAU, MAX_SPACING, FINAL)

# The spread of a noiseless series is 0, so any wobble would be an infinite z-score: the
# spread is floored at this fraction of the mean rate (a jump must be ~z × 10% off it), and
# at the plateau threshold × the level (a change too small to leave a plateau is no jump).
_MIN_RATE_SPREAD = 0.1
# Leaving a plateau takes a slope this many times the plateau threshold, so a series that
# hovers at the threshold does not enter and leave (and trigger) on every snapshot.
_PLATEAU_HYSTERESIS = 2.0


@dataclass(frozen=True)
class TriggerPolicy:
    """When the structure asks for an eval, and the eval budget (in optimizer steps)."""

    window: int = field(
        default=5, metadata={"help": "structural snapshots the slope spans (the z-score baseline: twice as many)"}
    )
    plateau_rel_slope: float = field(
        default=2e-3,
        metadata={"help": "plateau when |fitted slope| / mean of `metric` over the window is below this, per "
                          "step (steady linear growth alone is 1/step at step t: lower it for long runs)"},
    )
    z_threshold: float = field(
        default=6.0, metadata={"help": "divergence when the latest rate of change is this many sigmas off"}
    )
    min_spacing: int = field(default=10, metadata={"help": "fewest optimizer steps between two evals"})
    max_spacing: int = field(default=50, metadata={"help": "most optimizer steps without an eval"})
    metric: str = field(default="frobenius_norm", metadata={"help": "structural metric of plateau and regime"})
    divergence_metrics: tuple[str, ...] = field(
        default=("frobenius_norm", "sigma_max"), metadata={"help": "structural metrics watched for jumps"}
    )
    eval_at_end: bool = field(default=True, metadata={"help": "always evaluate at the last step"})
    reference_eval_every: int = field(
        default=0,
        metadata={"help": "fixed schedule (steps) the savings are measured against; 0: the Trainer's own "
                          "`eval_steps` when its eval_strategy is 'steps' (the schedule the user configured), "
                          "else every `min_spacing` steps"},
    )

    def __post_init__(self) -> None:
        if not is_int(self.window) or self.window < 3:
            raise UsageError(f"`window` must be an integer >= 3 (a slope and a spread need 3 points), got {self.window!r}")
        for name in ("min_spacing", "max_spacing"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_spacing < self.min_spacing:
            raise UsageError(f"`max_spacing` ({self.max_spacing}) must be >= `min_spacing` ({self.min_spacing})")
        for name in ("plateau_rel_slope", "z_threshold"):
            value = getattr(self, name)
            if not is_finite(value) or value <= 0:
                raise UsageError(f"`{name}` must be a finite number > 0, got {value!r}")
        if not is_int(self.reference_eval_every) or self.reference_eval_every < 0:
            raise UsageError(f"`reference_eval_every` must be an integer >= 0, got {self.reference_eval_every!r}")
        if isinstance(self.divergence_metrics, str):
            raise UsageError(f"`divergence_metrics` must be a tuple of names, got {self.divergence_metrics!r}")
        object.__setattr__(self, "divergence_metrics", tuple(self.divergence_metrics))

    def reference(self, configured_eval_steps: int | None = None) -> tuple[int, str]:
        """The fixed schedule the savings are counted against, and where it came from.

        An explicit `reference_eval_every` wins; else the user's configured `eval_steps`
        (what they would have paid without the trigger); else `min_spacing`, the trigger's top
        frequency, as a last resort when no schedule was configured.

        Example:
            >>> TriggerPolicy(min_spacing=5).reference(10)
            (10, 'eval_steps')
        """
        if self.reference_eval_every:
            return self.reference_eval_every, "reference_eval_every"
        if configured_eval_steps:
            return configured_eval_steps, "eval_steps"
        return self.min_spacing, "min_spacing"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["divergence_metrics"] = list(self.divergence_metrics)
        return d


@dataclass(frozen=True)
class Trigger:
    """One detected event: why, when it was seen, and the numbers behind it."""

    reason: str
    step: int
    detail: str
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TriggerDecision:
    """Whether to evaluate at `step`; when yes, the trigger it answers (and any others)."""

    step: int
    evaluate: bool
    trigger: Trigger | None = None
    also: tuple[str, ...] = ()  # other pending reasons the same eval answers

    @property
    def reason(self) -> str | None:
        return self.trigger.reason if self.trigger else None


class TriggerState:
    """The structural series seen so far and what it has asked for.

    Feed every structural snapshot to `observe`, ask `decide` at every optimizer step, and
    tell `evaluated` about evals somebody else asked for. `decide` commits: a firing
    decision counts as the eval at that step.
    """

    def __init__(self, policy: TriggerPolicy | None = None) -> None:
        self.policy = policy or TriggerPolicy()
        keep = 2 * self.policy.window + 2  # 2 * window rates as baseline, then the latest
        self._steps: deque[int] = deque(maxlen=keep)
        self._values: dict[str, deque[float]] = {
            m: deque(maxlen=keep) for m in {self.policy.metric, *self.policy.divergence_metrics}
        }
        self._pending: dict[str, Trigger] = {}
        self.last_eval_step = 0
        self._in_plateau = False
        self._nonfinite = False
        self._trend = 0  # sign of the last slope steep enough not to be a plateau

    # -- input -------------------------------------------------------------------------------

    def observe(self, step: int, metrics: Mapping[str, Any]) -> list[Trigger]:
        """Add one structural snapshot; returns the triggers it raised (also kept pending).

        A step at or before the last one seen is ignored (an eval snapshot at an interval
        step is the same snapshot). Missing metrics are skipped; non-finite ones raise
        `nonfinite` and stay out of the fits.
        """
        if self._steps and step <= self._steps[-1]:
            return []
        values = {m: metrics.get(m) for m in self._values}
        if any(isinstance(v, (int, float)) and not math.isfinite(v) for v in values.values()):
            bad = sorted(m for m, v in values.items() if isinstance(v, (int, float)) and not math.isfinite(v))
            found = [] if self._nonfinite else [Trigger(NONFINITE, step, f"non-finite {', '.join(bad)}")]
            self._nonfinite = True
            return self._queue(step, found)
        self._nonfinite = False
        if not is_finite(values[self.policy.metric]):
            return []  # a snapshot without the main metric says nothing about the slope
        self._steps.append(step)
        for m, v in values.items():  # a missing watched metric is NaN: its z-score waits it out
            self._values[m].append(float(v) if is_finite(v) else math.nan)  # type: ignore[arg-type]
        found = [t for m in self.policy.divergence_metrics if (t := self._divergence(m)) is not None]
        found += self._slope_events()
        return self._queue(step, found)

    def _queue(self, step: int, found: list[Trigger]) -> list[Trigger]:
        if step > self.last_eval_step:  # an eval at this very step already answers them
            for t in found:
                self._pending.setdefault(t.reason, t)
        return found

    def _divergence(self, metric: str) -> Trigger | None:
        need = 2 * self.policy.window + 2
        if len(self._steps) < need:
            return None
        steps = np.asarray(self._steps, dtype=np.float64)[-need:]
        rates = np.diff(np.asarray(self._values[metric])[-need:]) / np.diff(steps)
        if not np.isfinite(rates).all():
            return None
        base, latest = rates[:-1], float(rates[-1])
        mean = float(np.mean(base))
        level = abs(self._values[metric][-1])
        spread = max(float(np.std(base, ddof=1)), _MIN_RATE_SPREAD * abs(mean),
                     self.policy.plateau_rel_slope * level, 1e-12)  # fmt: skip
        z = (latest - mean) / spread
        if abs(z) < self.policy.z_threshold:
            return None
        return Trigger(
            DIVERGENCE, self._steps[-1],
            f"{metric} rate {latest:.4g}/step is {z:+.1f} sigma off its last {len(base)} rates (mean {mean:.4g})",
            {"z": z, "rate": latest, "mean_rate": mean, "metric_value": self._values[metric][-1]},
        )  # fmt: skip

    def _slope_events(self) -> list[Trigger]:
        """Plateau entry and regime changes from the fitted slope of the latest window."""
        w, p = self.policy.window, self.policy
        if len(self._steps) < w:
            return []
        steps = np.asarray(self._steps, dtype=np.float64)[-w:]
        values = np.asarray(self._values[p.metric])[-w:]
        span = float(steps[-1] - steps[0])
        change = relative_change(steps, values)  # |fitted change| across the window / level
        if change is None or span <= 0:
            return []
        rel = change / span
        signed = rel * float(np.sign(np.polyfit(steps - steps[0], values, 1)[0]))
        step, vals = self._steps[-1], {"rel_slope": signed, "metric_value": float(values[-1])}
        found: list[Trigger] = []
        if not self._in_plateau and rel < p.plateau_rel_slope:
            self._in_plateau = True
            found.append(Trigger(PLATEAU, step, f"{p.metric} relative slope {signed:.3g}/step over the last "
                                 f"{w} snapshots is below {p.plateau_rel_slope:g}", vals))  # fmt: skip
        elif self._in_plateau and rel > _PLATEAU_HYSTERESIS * p.plateau_rel_slope:
            self._in_plateau = False
            self._trend = int(np.sign(signed))
            found.append(Trigger(REGIME_CHANGE, step, f"{p.metric} moves again after a plateau "
                                 f"(relative slope {signed:.3g}/step)", vals))  # fmt: skip
        elif not self._in_plateau:
            sign, before = int(np.sign(signed)), self._trend
            self._trend = sign
            if before and sign != before:
                found.append(Trigger(REGIME_CHANGE, step, f"{p.metric} stopped {'growing' if before > 0 else 'shrinking'}"
                                     f" (relative slope {signed:.3g}/step)", vals))  # fmt: skip
        return found

    # -- output ------------------------------------------------------------------------------

    def decide(self, step: int, last_step: int | None = None) -> TriggerDecision:
        """Evaluate at `step`? `last_step`: the run's final step, when known (for `final`).

        Deterministic: the same series gives the same decisions and reasons.
        """
        if step <= self.last_eval_step and step > 0:
            return TriggerDecision(step, False)
        since = step - self.last_eval_step
        pending = [self._pending[r] for r in TRIGGER_REASONS if r in self._pending]
        chosen: Trigger | None = None
        if last_step is not None and step >= last_step and self.policy.eval_at_end:
            chosen = Trigger(FINAL, step, f"last step ({step})")
        elif pending and since >= self.policy.min_spacing:
            chosen = pending[0]
        elif since >= self.policy.max_spacing:
            chosen = Trigger(MAX_SPACING, step, f"{since} steps since the last eval (max_spacing {self.policy.max_spacing})")
        if chosen is None:
            return TriggerDecision(step, False)
        also = tuple(t.reason for t in pending if t is not chosen)
        self.evaluated(step)
        return TriggerDecision(step, True, chosen, also)

    def evaluated(self, step: int) -> None:
        """An eval ran at `step`: it answers every pending trigger and restarts the spacing."""
        if step >= self.last_eval_step:
            self.last_eval_step = step
            self._pending.clear()


def reference_evals(total_steps: int, every: int) -> int:
    """Evals a fixed schedule runs: every `every` steps, plus one at the end if off-grid
    (as the Trainer's step schedule does).

    Example:
        >>> reference_evals(120, 10), reference_evals(125, 10)
        (12, 13)
    """
    if total_steps <= 0:
        return 0
    return total_steps // every + (1 if total_steps % every else 0)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
