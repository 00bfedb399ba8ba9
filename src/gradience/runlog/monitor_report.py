"""What `gradience monitor` returns: the report's dataclasses, its stated thresholds, trends.

Kept apart from the streaming pass in `gradience.runlog.monitor` so readers of the result (the
CLI, the HTML report) see its shape without the machinery that fills it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradience.runlog.triggers import TriggerSummary

GAP_THRESHOLD = 1.5  # test ppl / train ppl above this: probably memorizing
CHANCE_MARGIN = 0.05  # test accuracy at most this far above chance: task set-up suspect
# Mean energy_rank_90 / r below this: 90% of the update's energy fits in under a quarter of
# the allocated directions. Stable rank is 1-3 on nearly every LLM run at r >= 8 (one direction
# dominates Σσ² / σ₁²), so a stable-rank rule fires always; the energy rank counts directions.
OVERPROVISION_THRESHOLD = 0.25
FLAT_THRESHOLD = 0.05  # |relative change| over a trend window below this: flat
STRUCTURAL_WINDOW = 5
LOSS_WINDOW = 20
MAX_KEPT = 50  # alerts kept; distinct alert codes, recommendation codes, splits, NaN paths
TRAIN_KEYS = ("loss", "lr", "grad_norm", "lora_grad_norm", "epoch")  # always shown (n/a when absent)
# Task kinds whose accuracy is a choice among labels; the others generate (exact match, tokens).
CLASSIFIER_KINDS = ("classification", "token_classification")
GENERATIVE_KINDS = ("causal_lm", "seq2seq_lm")
EXACT_MATCH_KEYS = ("exact_match", "em", "exact_match_accuracy")
TOKEN_ACCURACY_KEYS = ("mean_token_accuracy", "token_accuracy")
STRUCTURAL_KEYS = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90", "utilization")
TEST_SPLITS = ("test", "eval", "validation", "val", "dev")  # the first one logged is "test"
RUN_KEYS = ("model", "dataset", "task", "task_profile", "lora", "versions", "structural_interval",
            "eval_policy")  # fmt: skip
TRAINING_ARG_KEYS = (
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
    "gradient_accumulation_steps", "warmup_steps", "warmup_ratio", "weight_decay",
    "lr_scheduler_type", "max_grad_norm", "optim", "seed", "bf16", "fp16",
)  # fmt: skip
TREND_RULE = (
    f"flat when |relative change| < {FLAT_THRESHOLD:.0%}; relative change = (fitted end - fitted start) "
    "/ |fitted start|, the least-squares line's values at the window's first and last step, each "
    "clamped into the window's observed range (so a falling positive series reads above -100%)"
)
THRESHOLDS: dict[str, Any] = {
    "gap": GAP_THRESHOLD, "chance_margin": CHANCE_MARGIN, "overprovision_energy_rank_fraction": OVERPROVISION_THRESHOLD,
    "trend_flat": FLAT_THRESHOLD, "trend_rule": TREND_RULE,
    "structural_window": STRUCTURAL_WINDOW, "loss_window": LOSS_WINDOW,
}  # fmt: skip
HYPOTHESIS_NOTE = (
    "Recommendations are hypotheses to verify with an eval on held-out data, not predictions."
)


@dataclass(frozen=True)
class Trend:
    """Least-squares line through (step, value) points, labelled by TREND_RULE."""

    metric: str
    n_points: int
    first_step: int | None
    last_step: int | None
    latest: float | None
    slope_per_100_steps: float | None
    relative_change: float | None
    label: str  # rising | flat | falling | n/a (fewer than two distinct steps)
    threshold: float = FLAT_THRESHOLD


@dataclass(frozen=True)
class SplitEval:
    split: str
    step: int | None
    n_evals: int
    loss: float | None
    ppl: float | None
    ppl_source: str | None  # logged | exp(loss)
    accuracy: float | None
    metrics: dict[str, Any]  # the latest eval's metrics as logged
    exact_match: float | None = None  # generated answer == reference (a causal LM's accuracy)
    token_accuracy: float | None = None  # next-token accuracy (TRL's mean_token_accuracy)


@dataclass(frozen=True)
class Chance:
    rate: float
    basis: str  # num_labels | majority_rate | assumed_binary
    detail: str


@dataclass(frozen=True)
class Signals:
    train_ppl: float | None
    train_ppl_source: str | None  # eval:train, or train_step when no train split was evaluated
    train_accuracy: float | None
    test_split: str | None
    test_ppl: float | None
    test_accuracy: float | None
    gap: float | None  # test ppl / train ppl
    best_test_loss: float | None
    best_test_loss_step: int | None
    chance: Chance | None  # only for a classifier whose label count is known
    task_kind: str | None = None  # run_start's task.kind: causal_lm, classification, ...
    test_loss: float | None = None
    test_exact_match: float | None = None
    test_token_accuracy: float | None = None


@dataclass(frozen=True)
class TrainSummary:
    n_steps: int
    first_step: int | None
    last_step: int | None
    latest: dict[str, float | None]  # latest finite value of each TRAIN_KEYS
    min_loss: float | None
    min_loss_step: int | None
    loss_trend: Trend | None  # over the last LOSS_WINDOW finite losses


@dataclass(frozen=True)
class Snapshot:
    step: int | None
    reason: str | None
    metrics: dict[str, float | None]  # STRUCTURAL_KEYS aggregates


@dataclass(frozen=True)
class Structural:
    n_snapshots: int
    latest: Snapshot
    n_modules: int
    cost_ms_median: float | None  # a busy machine makes a few snapshots slow: a mean hides the typical
    cost_ms_p95: float | None
    window: tuple[Snapshot, ...]  # the last STRUCTURAL_WINDOW, oldest first
    trends: tuple[Trend, ...]
    zero_modules: tuple[str, ...] = ()  # latest snapshot: update exactly zero, not in the means
    n_zero_modules: int = 0


@dataclass(frozen=True)
class AuditBlock:
    step: int | None
    peft_dir: str | None
    metrics: dict[str, Any]
    suggestion: dict[str, Any]


@dataclass(frozen=True)
class Alert:
    step: int | None
    severity: str
    code: str
    message: str


@dataclass(frozen=True)
class Alerts:
    total: int
    by_code: dict[str, int]
    by_severity: dict[str, int]
    latest: tuple[Alert, ...]  # the last MAX_KEPT, oldest first


@dataclass(frozen=True)
class NonFinite:
    records: int  # records whose NaN/Inf values the writer replaced by null
    first_step: int | None
    last_step: int | None
    by_path: dict[str, int]  # "<event>:<path>" -> count


@dataclass(frozen=True)
class Recommendation:
    """A hypothesis to verify: `source` "monitor" (a rule of this module) or "log"."""

    code: str
    message: str
    threshold: float | None
    value: float | None
    rule: str
    source: str
    step: int | None = None


@dataclass(frozen=True)
class MonitorReport:
    """Everything `gradience monitor` shows; `to_dict()` is the `--json` output."""

    path: str
    run_id: str | None  # the last one seen
    run_ids: tuple[str, ...]
    status: str  # ok | error | aborted | incomplete (no run_end: still running or crashed)
    status_note: str
    n_records: int
    last_step: int | None
    n_resumes: int
    run: dict[str, Any]  # RUN_KEYS of the last run_start (null when absent) + training_args
    train: TrainSummary
    evals: dict[str, SplitEval]
    signals: Signals
    structural: Structural | None
    audit: AuditBlock | None  # the latest `lora_audit` (from `gradience audit --append`)
    alerts: Alerts
    nonfinite: NonFinite
    recommendations: tuple[Recommendation, ...]
    recommendation_note: str
    thresholds: dict[str, Any]
    missing: tuple[str, ...]
    skipped_lines: int
    read_problems: tuple[str, ...]  # one line per kind of problem, with line numbers
    triggers: TriggerSummary | None = None  # trigger-based eval: each trigger and the savings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples as lists, finite numbers or null)."""
        return json_ready(dataclasses.asdict(self))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # e.g. `1e999` in a hand-edited log parses as inf
    return obj


def trend(metric: str, points: Sequence[tuple[int | None, float | None]]) -> Trend:
    """Fit a line through (step, value) points; label it with the `FLAT_THRESHOLD` rule.

    Example:
        >>> trend("loss", [(0, 1.0), (100, 0.8), (200, 0.6)]).label
        'falling'
    """
    pts = [(s, v) for s, v in points if s is not None and v is not None]
    first, last, latest = (pts[0][0], pts[-1][0], pts[-1][1]) if pts else (None, None, None)
    xs, ys = [float(s) for s, _ in pts], [v for _, v in pts]
    mx, my = (sum(xs) / len(xs), sum(ys) / len(ys)) if pts else (0.0, 0.0)
    sxx = sum((x - mx) ** 2 for x in xs)
    if len(pts) < 2 or sxx == 0:
        return Trend(metric, len(pts), first, last, latest, None, None, "n/a")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    lo, hi = min(ys), max(ys)
    start = min(max(my + slope * (xs[0] - mx), lo), hi)
    end = min(max(my + slope * (xs[-1] - mx), lo), hi)
    change = end - start
    rel = change / abs(start) if start != 0 else (0.0 if change == 0 else None)
    flat = rel is not None and abs(rel) < FLAT_THRESHOLD
    label = "flat" if flat else ("rising" if slope > 0 else "falling")
    return Trend(metric, len(pts), first, last, latest, 100.0 * slope, rel, label)
