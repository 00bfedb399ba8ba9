"""Running a `TriggerPolicy` inside a `transformers.Trainer`: when to set `should_evaluate`,
the trigger records, eval timing and the savings reported in `run_end`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from gradience.integrations.trigger import (
    TRIGGER_KIND,
    TriggerDecision,
    TriggerPolicy,
    TriggerState,
    is_finite,
    reference_evals,
)


class TrainerTrigger:
    """Glue between `TriggerState` and a `transformers.Trainer` (duck-typed: no imports).

    Who owns the schedule: with the Trainer's `eval_strategy="no"` nothing is overridden;
    the trigger only adds evals. With `"steps"` or `"epoch"` the Trainer's own schedule is
    overridden: `should_evaluate` is cleared on every step and epoch end the trigger did not
    pick (one warning says so). Callbacks that run after Gradience's, and explicit
    `trainer.evaluate()` calls, are never suppressed; their evals count and restart the
    spacing like any other.
    """

    def __init__(self, policy: TriggerPolicy | None = None, agree: Callable[[bool], bool] | None = None) -> None:
        self.policy = policy or TriggerPolicy()
        self.state = TriggerState(self.policy)
        # Only rank 0 sees the snapshots, but a Trainer eval is collective: every rank must
        # call `agree` (an OR over ranks) at the same points, so it runs on every call.
        self.agree = agree or (lambda flag: flag)
        self.override = False
        self.triggers: list[TriggerDecision] = []
        self._eval_step: int | None = None  # the step an eval was agreed for
        self._eval_seconds: dict[int, float] = {}
        self._mark: float | None = None
        self.configured_eval_steps: int | None = None  # the Trainer's schedule, if "steps"

    def begin(self, args: Any, state: Any = None) -> str | None:
        """Decide whether the Trainer's schedule is overridden; returns a warning if it is.

        A resumed run counts the spacing from the resume step, not from step 0.
        """
        self.state.evaluated(int(getattr(state, "global_step", 0) or 0))
        strategy = getattr(args, "eval_strategy", "no")
        strategy = str(getattr(strategy, "value", strategy))
        self.override = strategy not in ("no", "None")
        if strategy == "steps":  # the configured schedule: the trigger replaces it, and is measured against it
            every: Any = getattr(args, "eval_steps", None)
            if isinstance(every, float) and 0 < every < 1:  # a fraction of max_steps
                every = math.ceil(every * int(getattr(state, "max_steps", 0) or 0))
            self.configured_eval_steps = int(every) if is_finite(every) and every >= 1 else None
            return None
        if self.override:
            return (f"gradience: eval_policy='trigger' overrides the Trainer's eval_strategy={strategy!r}; "
                    "set eval_strategy='no' or 'steps' to silence this")  # fmt: skip
        return None

    def observe(self, step: int, reason: str, metrics: Mapping[str, float]) -> None:
        """`Recorder.on_snapshot` hook: every structural snapshot feeds the series."""
        self.state.observe(step, metrics)

    def step_end(self, state: Any, control: Any, recorder: Any) -> None:
        """Set `control.should_evaluate` from the trigger; log the trigger when it fires.

        Called twice per step: before the structural snapshot (evals owed whatever it says:
        final, max_spacing, deferred; the snapshot is then the eval's) and after it (what
        the fresh snapshot says).
        """
        step = int(state.global_step)
        local = self._eval_step == step or self._fire(step, state, recorder)
        if self.agree(local):
            if self._eval_step != step:  # another rank's trigger: this eval answers ours too
                self._eval_step = step
                self.state.evaluated(step)
            control.should_evaluate = True
        elif self.override:
            control.should_evaluate = False
        self._mark = time.perf_counter()

    def _fire(self, step: int, state: Any, recorder: Any) -> bool:
        since = step - self.state.last_eval_step
        decision = self.state.decide(step, last_step=int(getattr(state, "max_steps", 0) or 0) or None)
        if not decision.evaluate or decision.trigger is None:
            return False
        self.triggers.append(decision)
        self._eval_step = step
        t = decision.trigger
        recorder.write(
            "metrics", step, kind=TRIGGER_KIND, reason=t.reason, detail=t.detail, detected_step=t.step,
            also=list(decision.also), metrics=dict(t.values), steps_since_eval=since,
        )  # fmt: skip
        return True

    def epoch_end(self, state: Any, control: Any) -> None:
        """Clear the Trainer's epoch eval unless the trigger picked this step."""
        if self.override and self._eval_step != int(state.global_step):
            control.should_evaluate = False

    def evaluated(self, step: int, runtime: Any = None) -> None:
        """One eval (one split) ran at `step`; `runtime`: the Trainer's measured seconds."""
        now = time.perf_counter()
        if is_finite(runtime):
            seconds = float(runtime)
        else:  # no timing from the Trainer: wall time since the step ended (or the last split)
            seconds = now - self._mark if self._mark is not None else 0.0
        self._mark = now
        self._eval_seconds[step] = self._eval_seconds.get(step, 0.0) + seconds
        self.state.evaluated(step)

    def summary(self, total_steps: int) -> dict[str, Any]:
        """What the run's `run_end` reports: evals run, their seconds, and the savings
        against the fixed schedule the user configured (`TriggerPolicy.reference`) over the
        same steps, priced at this run's mean seconds per eval."""
        evals = len(self._eval_seconds)
        seconds = sum(self._eval_seconds.values())
        mean = seconds / evals if evals else None
        every, source = self.policy.reference(self.configured_eval_steps)
        ref = reference_evals(total_steps, every)
        by_reason: dict[str, int] = {}
        for d in self.triggers:
            by_reason[str(d.reason)] = by_reason.get(str(d.reason), 0) + 1
        return {
            "policy": self.policy.to_dict(), "evals_run": evals, "triggered": len(self.triggers),
            "by_reason": by_reason, "eval_seconds": round(seconds, 3),
            "mean_eval_seconds": None if mean is None else round(mean, 3),
            "reference_eval_every": every, "reference_source": source, "reference_evals": ref,
            "evals_saved": ref - evals,
            "eval_seconds_saved": None if mean is None else round((ref - evals) * mean, 3),
        }  # fmt: skip
