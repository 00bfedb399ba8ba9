"""Early-stopping simulation: when would each stop rule have ended this run, and at what cost?

Replays a finished run's log under two kinds of rule:

- eval patience: stop after `patience` evals without an improvement of eval loss by more
  than `min_delta`. It spends one eval call per eval up to the stop.
- structural plateau: stop when a structural metric's fitted relative change over the last
  `window` points stays below `threshold` for `plateau_patience` consecutive points. It
  spends a single eval, at the stop, to report the loss it stopped at.

Structural rules are replayed on the steps where both a structural record and an eval exist
(exact alignment), so the one eval a structural rule spends is a logged one, not a guess.
Regret = eval loss at the stop − the best eval loss anywhere in the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gradience.analysis._finite import fin
from gradience.analysis.align import Series, align_exact


@dataclass(frozen=True)
class EarlyStopPolicy:
    """Parameters of the simulated stop rules."""

    patience: int = field(
        default=3, metadata={"help": "evals without improvement before the eval-loss rule stops"}
    )
    min_delta: float = field(
        default=0.0, metadata={"help": "an eval-loss drop must exceed this to count as improvement"}
    )
    window: int = field(
        default=5, metadata={"help": "points a structural metric's plateau slope is fitted over"}
    )
    threshold: float = field(
        default=0.01,
        metadata={
            "help": "plateau when the fitted change across the window is below this fraction of the window mean"
        },
    )
    plateau_patience: int = field(
        default=1, metadata={"help": "consecutive plateaued points before a structural rule stops"}
    )

    def __post_init__(self) -> None:
        for name in ("patience", "plateau_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.window < 2:
            raise ValueError(f"`window` must be >= 2, got {self.window}")
        if not (0 <= self.min_delta < math.inf and 0 < self.threshold < math.inf):
            raise ValueError("`min_delta` must be finite and >= 0, `threshold` finite and > 0")


def eval_patience_stop(losses: np.ndarray, patience: int, min_delta: float = 0.0) -> int | None:
    """Index of the eval at which patience runs out, or None if it never does.

    Example:
        >>> eval_patience_stop(np.array([1.0, 0.8, 0.6, 0.7, 0.75, 0.8]), patience=3)
        5
    """
    best, waited = np.inf, 0
    for i, value in enumerate(losses):
        if value < best - min_delta:
            best, waited = value, 0
        else:
            waited += 1
            if waited >= patience:
                return i
    return None


def relative_change(steps: np.ndarray, values: np.ndarray) -> float | None:
    """|least-squares slope| × step span / |mean|: the fitted change across the window as a
    fraction of its level. None when the level is 0 (an adapter that has not moved yet is
    not a plateau)."""
    level = abs(float(np.mean(values)))
    if level == 0.0:
        return None
    t = steps.astype(np.float64) - steps[0]
    slope = float(np.polyfit(t, values, 1)[0]) if np.ptp(t) > 0 else 0.0
    return abs(slope) * float(t[-1]) / level


def plateau_stop(
    steps: np.ndarray, values: np.ndarray, window: int, threshold: float, patience: int = 1
) -> int | None:
    """Index at which a metric has been flat (`relative_change` < threshold) for `patience`
    consecutive windows, or None.

    Example:
        >>> v = np.array([1.0, 2.0, 3.0, 3.5, 3.6, 3.6, 3.6, 3.6])
        >>> plateau_stop(np.arange(8) * 10, v, window=3, threshold=0.01)
        6
    """
    run = 0
    for i in range(window - 1, len(values)):
        w = slice(i - window + 1, i + 1)
        change = relative_change(steps[w], values[w])
        run = run + 1 if change is not None and change < threshold else 0
        if run >= patience:
            return i
    return None


@dataclass(frozen=True)
class StopOutcome:
    """What one rule would have done on this run."""

    rule: str  # "eval_patience" or "plateau"
    signal: str  # "eval_loss" or the structural metric
    stopped: bool  # False: the rule never fired and the run went to its last eval
    stop_step: int | None
    eval_calls: int
    loss_at_stop: float | None
    regret: float | None
    steps_saved: int | None
    reason: str | None = None


@dataclass(frozen=True)
class EarlyStop:
    """Every rule's outcome next to the run's own best eval loss."""

    policy: EarlyStopPolicy
    n_evals: int
    best_eval_loss: float | None
    best_step: int | None
    last_step: int | None
    outcomes: tuple[StopOutcome, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rules"] = d.pop("outcomes")
        return d


def _outcome(
    rule: str, signal: str, at: int | None, steps: np.ndarray, losses: np.ndarray,
    best: float, last_step: int, calls: int,
) -> StopOutcome:  # fmt: skip
    i = len(steps) - 1 if at is None else at
    loss = float(losses[i])
    return StopOutcome(
        rule, signal, at is not None, int(steps[i]), calls, fin(loss), fin(loss - best),
        int(last_step - steps[i]),
    )  # fmt: skip


def simulate_early_stop(
    eval_loss: Series,
    structural: Mapping[str, Series],
    policy: EarlyStopPolicy | None = None,
) -> EarlyStop:
    """Replay the eval-patience rule and one plateau rule per structural metric.

    Args:
        eval_loss: the run's eval loss (target split), every logged eval.
        structural: metric name → series; each is joined to eval loss on exact steps.
        policy: rule parameters (defaults: `EarlyStopPolicy()`).

    Returns:
        `EarlyStop`; a rule that never fires is reported at the last eval (`stopped` False).
    """
    policy = policy or EarlyStopPolicy()
    steps, losses = eval_loss.steps, eval_loss.values
    if len(eval_loss) == 0:
        return EarlyStop(policy, 0, None, None, None, ())
    best_i = int(np.argmin(losses))
    best, last = float(losses[best_i]), int(steps[-1])
    at = eval_patience_stop(losses, policy.patience, policy.min_delta)
    calls = len(steps) if at is None else at + 1
    outcomes = [_outcome("eval_patience", "eval_loss", at, steps, losses, best, last, calls)]
    for name, series in structural.items():
        pair = align_exact(series, eval_loss)
        if len(pair) < policy.window:
            reason = (
                f"{len(pair)} exactly matched point(s); the plateau window needs {policy.window}"
            )
            outcomes.append(StopOutcome("plateau", name, False, None, 0, None, None, None, reason))
            continue
        at = plateau_stop(
            pair.steps, pair.x, policy.window, policy.threshold, policy.plateau_patience
        )
        outcomes.append(_outcome("plateau", name, at, pair.steps, pair.y, best, last, 1))
    return EarlyStop(policy, len(steps), fin(best), int(steps[best_i]), last, tuple(outcomes))
