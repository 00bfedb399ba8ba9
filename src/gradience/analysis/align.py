"""Series from a run log, joined on exact shared steps, and the logging cadence.

Why exact steps only: a structural snapshot carried forward onto a later eval step pairs a
stale adapter with a newer loss, and a lead-lag analysis of such pairs reports a lag that
is an artifact of the logging cadence (research note 004: a 50/25 structural/eval cadence
produced a one-interval "lead" that vanished at a matched 25/25 cadence). So `align_exact`
keeps only the steps both series observed, and `forward_fill_align` exists only to
demonstrate that artifact.

Example:
    >>> run = load_run("runs/toy/run.jsonl")  # doctest: +SKIP
    >>> pair = align_exact(run.structural["frobenius_norm"], run.eval_loss)  # doctest: +SKIP
    >>> detect_cadence(run.structural_steps, run.eval_loss.steps).matched  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gradience.errors import TelemetryError
from gradience.telemetry import ReadProblems, iter_record_data

# Held-out splits in order of preference when the caller names none.
SPLIT_PREFERENCE: tuple[str, ...] = ("test", "eval", "validation")
# `train_step` fields loaded as series; `loss` is renamed so it cannot be taken for eval loss.
TRAIN_FIELDS: dict[str, str] = {
    "loss": "train_loss", "lr": "lr", "grad_norm": "grad_norm", "lora_grad_norm": "lora_grad_norm",
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class Series:
    """One quantity observed at some steps: `steps` strictly increasing, `values` finite."""

    name: str
    steps: np.ndarray  # int64, shape (n,)
    values: np.ndarray  # float64, shape (n,)

    def __post_init__(self) -> None:
        if self.steps.shape != self.values.shape or self.steps.ndim != 1:
            raise ValueError(f"series `{self.name}`: steps and values must be 1-D, same length")
        if self.steps.size > 1 and not bool(np.all(np.diff(self.steps) > 0)):
            raise ValueError(f"series `{self.name}`: steps must be strictly increasing")

    @classmethod
    def from_points(cls, name: str, points: Mapping[int, float]) -> Series:
        """Build from `{step: value}`; steps are sorted, non-finite values dropped."""
        items = sorted((int(s), float(v)) for s, v in points.items() if np.isfinite(v))
        steps = np.array([s for s, _ in items], dtype=np.int64)
        values = np.array([v for _, v in items], dtype=np.float64)
        return cls(name, steps, values)

    def __len__(self) -> int:
        return int(self.steps.size)


@dataclass(frozen=True, eq=False)
class Aligned:
    """Two series at the same steps: `x` (structure) and `y` (eval loss) at `steps`."""

    steps: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.size)


def align_exact(x: Series, y: Series) -> Aligned:
    """Join two series on the steps both observed; never fills, never interpolates.

    Example:
        >>> a = Series.from_points("frob", {50: 1.0, 100: 2.0})
        >>> b = Series.from_points("loss", {25: 0.9, 50: 0.8, 75: 0.7, 100: 0.6})
        >>> align_exact(a, b).steps.tolist()
        [50, 100]
    """
    steps, ix, iy = np.intersect1d(x.steps, y.steps, assume_unique=True, return_indices=True)
    return Aligned(steps.astype(np.int64), x.values[ix], y.values[iy])


def forward_fill_align(source: Series, grid: Series) -> Aligned:
    """NAIVE, for demonstrations only: carry `source` forward onto every step of `grid`.

    Each grid step gets the last `source` value at or before it (grid steps before the first
    source value are dropped). This is the alignment that manufactures a spurious lag when
    the two cadences differ: a value seen at step 50 is paired with a loss at step 75.
    Analysis code never calls it; `align_exact` is the alignment to use.

    Returns:
        `Aligned` with `x` = filled `source` values and `y` = `grid` values at grid steps.
    """
    idx = np.searchsorted(source.steps, grid.steps, side="right") - 1
    keep = idx >= 0
    return Aligned(grid.steps[keep], source.values[idx[keep]], grid.values[keep])


def unmatched_steps(structural_steps: np.ndarray, eval_steps: np.ndarray) -> np.ndarray:
    """Eval steps with no structural record at the same step."""
    return np.setdiff1d(eval_steps, structural_steps, assume_unique=True)


def modal_step(steps: Sequence[int] | np.ndarray) -> int | None:
    """Most frequent difference between consecutive distinct steps (ties: the smallest).

    Why the mode: a run's last snapshot (`reason: "final"`) or a resume adds one odd gap;
    the mode is the cadence the run was configured with. None with fewer than two steps.
    """
    unique = np.unique(np.asarray(steps, dtype=np.int64))
    if unique.size < 2:
        return None
    diffs, counts = np.unique(np.diff(unique), return_counts=True)
    return int(diffs[np.argmax(counts)])  # np.unique sorts, argmax takes the first maximum


@dataclass(frozen=True)
class Cadence:
    """How often structure and eval were logged, and whether every eval has a snapshot.

    `matched` is True when every eval step has a structural record at the same step (the
    structural cadence may be finer); only then can a lag be read on the eval grid.
    """

    matched: bool
    structural_every: int | None
    eval_every: int | None
    unmatched_eval_steps: int
    eval_steps: int
    structural_steps: int
    matched_steps: int
    declared_structural_interval: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_cadence(
    structural_steps: np.ndarray, eval_steps: np.ndarray, declared: int | None = None
) -> Cadence:
    """Cadence of the two record kinds; `declared` is `structural_interval` from `run_start`.

    Example:
        >>> detect_cadence(np.arange(50, 1201, 50), np.arange(25, 1201, 25)).unmatched_eval_steps
        24
    """
    structural = np.unique(np.asarray(structural_steps, dtype=np.int64))
    evals = np.unique(np.asarray(eval_steps, dtype=np.int64))
    missing = unmatched_steps(structural, evals).size
    return Cadence(
        matched=bool(evals.size > 0 and missing == 0),
        structural_every=modal_step(structural),
        eval_every=modal_step(evals),
        unmatched_eval_steps=int(missing),
        eval_steps=int(evals.size),
        structural_steps=int(structural.size),
        matched_steps=int(evals.size - missing),
        declared_structural_interval=declared,
    )


@dataclass(frozen=True, eq=False)
class RunSeries:
    """Everything analysis needs from one run log, as series keyed by step."""

    path: str
    run_id: str | None
    target_split: str
    splits: tuple[str, ...]
    eval_loss: Series
    structural: Mapping[str, Series]
    train: Mapping[str, Series]
    structural_steps: np.ndarray  # every step that has a structural record
    declared_structural_interval: int | None = None
    eval_policy: Any = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def metric(self, name: str) -> Series | None:
        """A structural metric by name, else a `train_step` field (`grad_norm`, ...), else None."""
        if name in self.structural:
            return self.structural[name]
        return self.train.get(name)

    def cadence(self) -> Cadence:
        return detect_cadence(
            self.structural_steps, self.eval_loss.steps, self.declared_structural_interval
        )


class _Points:
    """Append-only (step, value) pairs in two packed arrays: 16 bytes a point, not ~150."""

    __slots__ = ("steps", "values")

    def __init__(self) -> None:
        self.steps = array("q")
        self.values = array("d")

    def series(self, name: str) -> Series:
        """Sorted by step; where a step repeats, the later point wins (as in a dict)."""
        steps = np.frombuffer(self.steps, dtype=np.int64) if self.steps else np.zeros(0, np.int64)
        values = np.frombuffer(self.values, dtype=np.float64) if self.values else np.zeros(0)
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        last = np.ones(steps.size, dtype=bool)
        last[:-1] = steps[1:] != steps[:-1]
        return Series(name, steps[last].copy(), values[last].copy())


@dataclass
class _Collector:
    train_fields: Mapping[str, str] = field(default_factory=lambda: TRAIN_FIELDS)
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, _Points] = field(default_factory=dict)
    structural: dict[str, _Points] = field(default_factory=dict)
    structural_steps: set[int] = field(default_factory=set)
    train: dict[str, _Points] = field(default_factory=dict)
    eval_records: int = 0

    def add(self, event: str, step: int | None, data: dict[str, Any]) -> None:
        # Later records at a step replace earlier ones: after a resume from an earlier
        # checkpoint, the re-run trajectory is the one the run ended on.
        if event == "run_start" and not self.config:
            config = data.get("config")
            config = config if isinstance(config, dict) else {}
            self.config = {**config, **{k: data[k] for k in _START_KEYS if k in data}}
        elif step is None:
            return
        elif event == "train_step":  # first: most records of a long log are train steps
            for key, name in self.train_fields.items():
                value = _number(data.get(key))
                if value is not None:
                    _add(self.train, name, step, value)
        elif event == "eval":
            self.eval_records += 1
            split, loss = data.get("split"), _eval_loss(data)
            if isinstance(split, str) and loss is not None:
                _add(self.evals, split, step, loss)
        elif event == "metrics" and data.get("kind") == "structural":
            self.structural_steps.add(step)
            for name, value in _numbers(data.get("metrics")).items():
                _add(self.structural, name, step, value)


def _add(table: dict[str, _Points], name: str, step: int, value: float) -> None:
    points = table.get(name)
    if points is None:
        points = table[name] = _Points()
    points.steps.append(step)
    points.values.append(value)


_START_KEYS = ("structural_interval", "eval_policy")


def _number(v: Any) -> float | None:
    """A finite float from a JSON number (not a bool, not beyond float range), else None."""
    if type(v) is float:
        return v if v - v == 0 else None  # `x - x` is NaN for inf and NaN
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            f = float(v)
        except OverflowError:
            return None
        return f if math.isfinite(f) else None
    return None


def _numbers(obj: Any) -> dict[str, float]:
    if not isinstance(obj, dict):
        return {}
    return {k: f for k, v in obj.items() if (f := _number(v)) is not None}


def _eval_loss(data: dict[str, Any]) -> float | None:
    metrics = _numbers(data.get("metrics"))
    for key in ("loss", "eval_loss", f"{data.get('split')}_loss"):
        if key in metrics:
            return metrics[key]
    return None


def choose_split(splits: Sequence[str], target_split: str | None, where: str = "") -> str:
    """The eval split to analyse: `target_split` if given, else test > eval > validation.

    A log with one split that is not `train` uses it; `train` is never chosen silently,
    because the target is loss on held-out data.

    Raises:
        TelemetryError: the named split is absent, or no held-out split can be chosen.
    """
    prefix = f"{where}: " if where else ""
    seen = ", ".join(sorted(splits)) or "none"
    if target_split is not None:
        if target_split not in splits:
            raise TelemetryError(
                f"{prefix}no eval loss for split `{target_split}` (splits seen: {seen})"
            )
        return target_split
    for name in SPLIT_PREFERENCE:
        if name in splits:
            return name
    held_out = [s for s in splits if s != "train"]
    if len(held_out) == 1:
        return held_out[0]
    raise TelemetryError(
        f"{prefix}no held-out eval split ({', '.join(SPLIT_PREFERENCE)}); splits seen: {seen}; "
        "name one with --split"
    )


def load_run(
    path: str | os.PathLike[str],
    target_split: str | None = None,
    train_fields: Sequence[str] | None = None,
) -> RunSeries:
    """Stream a run log into series: eval loss of one split, structural metrics, train fields.

    Args:
        path: a `run.jsonl` written by Gradience telemetry.
        target_split: eval split whose `metrics.loss` is the target; default: `choose_split`.
        train_fields: which `train_step` series to keep, by series name (`train_loss`, `lr`,
            `grad_norm`, `lora_grad_norm`); default all. Keeping none makes memory
            independent of the number of train steps.

    Returns:
        `RunSeries`; unreadable lines are skipped and summarised in `notes`. Records
        without a step are ignored; when a step repeats (a resume from an earlier
        checkpoint), the later record wins.

    Raises:
        UsageError: the file does not exist.
        TelemetryError: the log has no eval loss, no structural records, or no usable split.
    """
    problems = ReadProblems(path)
    wanted = TRAIN_FIELDS if train_fields is None else {
        k: v for k, v in TRAIN_FIELDS.items() if v in train_fields
    }  # fmt: skip
    acc = _Collector(wanted)
    for _, data in iter_record_data(path, problems=problems):
        if acc.run_id is None:
            acc.run_id = data["run_id"]
        acc.add(data["event"], data["step"], data)
    missing = []
    if not acc.evals:
        missing.append("no eval records with a loss" if acc.eval_records else "no eval records")
    if not acc.structural_steps:
        missing.append("no structural records (`metrics` events of kind `structural`)")
    if missing:
        raise TelemetryError(
            f"{path}: {' and '.join(missing)}; analyze needs both (log them with GradienceCallback)"
        )
    split = choose_split(tuple(acc.evals), target_split, str(path))
    declared = acc.config.get("structural_interval")
    return RunSeries(
        path=str(path),
        run_id=acc.run_id,
        target_split=split,
        splits=tuple(sorted(acc.evals)),
        eval_loss=acc.evals[split].series("eval_loss"),
        structural={k: v.series(k) for k, v in acc.structural.items()},
        train={k: v.series(k) for k, v in acc.train.items()},
        structural_steps=np.array(sorted(acc.structural_steps), dtype=np.int64),
        declared_structural_interval=declared if type(declared) is int else None,
        eval_policy=acc.config.get("eval_policy"),
        notes=tuple(problems.messages()),
    )
