"""Plots of a run log: structural metrics and eval loss against step, trigger points marked.

One panel per structural metric (left axis) with the eval loss of one held-out split on a
twin right axis, so the eye can check what `gradience analyze` measures: whether structure
moves with eval loss. Eval steps are dots on the loss curve; trigger records (a `metrics`
record of kind `eval_trigger`, or an eval or structural record with `reason: "trigger"`)
are dotted vertical lines, and the eval each trigger caused (the first at or after it) is
ringed.

matplotlib (`pip install gradience[plot]`) is imported inside `render_png`; importing this
module needs numpy only. Figures are drawn on the Agg canvas directly, never through pyplot,
so no global backend is switched and nothing opens a window.

    from gradience.runlog.plot import plot_run

    result = plot_run("runs/toy/run.jsonl", "runs/toy/run.png")
    print(result.width_px, result.height_px, result.n_evals)
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradience._io import replace_atomic
from gradience.analysis.align import Series, choose_split
from gradience.errors import TelemetryError, UsageError, require
from gradience.integrations.trigger import TRIGGER_KIND
from gradience.telemetry import ReadProblems, iter_records

PLOT_METRICS: tuple[str, ...] = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90")

DPI = 100
_PANEL_INCHES = (9.0, 2.3)
_STRUCTURE_COLOR, _LOSS_COLOR, _TRIGGER_COLOR = "#1f77b4", "#d62728", "#2ca02c"


@dataclass(frozen=True, eq=False)
class RunCurves:
    """What the plot draws, read from one log; `eval_loss` is None when no eval has a loss."""

    path: str
    run_id: str | None
    structural: dict[str, Series]
    eval_split: str | None
    eval_loss: Series | None
    trigger_steps: np.ndarray  # int64: steps of trigger records, sorted, unique
    triggered_eval_steps: np.ndarray  # int64: eval steps caused by a trigger (subset of eval_loss.steps)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlotResult:
    """A written plot: where, how big, and what it shows; `to_dict()` is the `--json` output."""

    path: str
    out: str
    metrics: tuple[str, ...]
    eval_split: str | None
    n_structural: int
    n_evals: int
    n_triggers: int
    n_triggered_evals: int
    width_px: int
    height_px: int
    bytes: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"], out["notes"] = list(self.metrics), list(self.notes)
        return out


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
        return float(v)
    return None


def _is_trigger(event: str, data: dict[str, Any]) -> bool:
    if event == "metrics" and data.get("kind") == TRIGGER_KIND:
        return True
    return event in ("eval", "metrics") and (data.get("reason") == "trigger" or data.get("trigger") is True)


def read_curves(path: str | os.PathLike[str], split: str | None = None) -> RunCurves:
    """Stream a run log into the series the plot draws.

    Args:
        path: a `run.jsonl` written by Gradience telemetry.
        split: eval split whose loss is drawn; default: test, then eval, then validation.

    Returns:
        `RunCurves`; later records at a repeated step replace earlier ones.

    Raises:
        UsageError: the file does not exist.
        TelemetryError: the log has no structural records (`metrics` of kind `structural`).
    """
    problems = ReadProblems(path)
    structural: dict[str, dict[int, float]] = {}
    losses: dict[str, dict[int, float]] = {}
    triggers: set[int] = set()
    run_id, n_structural = None, 0
    for rec in iter_records(path, problems=problems):
        run_id = run_id or rec.run_id
        data, step = rec.data, rec.step
        if step is None:
            continue
        if _is_trigger(rec.event, data):
            triggers.add(step)
        metrics: dict[str, Any] = data["metrics"] if isinstance(data.get("metrics"), dict) else {}
        if rec.event == "metrics" and data.get("kind") == "structural":
            n_structural += 1
            for name, value in metrics.items():
                if (v := _number(value)) is not None:
                    structural.setdefault(name, {})[step] = v
        elif rec.event == "eval" and isinstance(data.get("split"), str):
            loss = _number(metrics.get("loss", metrics.get("eval_loss")))
            if loss is not None:
                losses.setdefault(data["split"], {})[step] = loss
    if n_structural == 0:
        raise TelemetryError(
            f"{path}: no structural records (`metrics` events of kind `structural`) to plot; "
            "log them with GradienceCallback(structural_interval=N)"
        )
    chosen = choose_split(tuple(losses), split, str(path)) if losses or split else None
    eval_loss = Series.from_points("eval_loss", losses[chosen]) if chosen else None
    trigger_steps = np.array(sorted(triggers), dtype=np.int64)
    return RunCurves(
        path=str(path), run_id=run_id,
        structural={k: Series.from_points(k, v) for k, v in structural.items()},
        eval_split=chosen, eval_loss=eval_loss, trigger_steps=trigger_steps,
        triggered_eval_steps=_triggered_evals(trigger_steps, eval_loss),
        notes=tuple(problems.messages()),
    )  # fmt: skip


def _triggered_evals(triggers: np.ndarray, eval_loss: Series | None) -> np.ndarray:
    """The first eval at or after each trigger step (an eval and its trigger share a step, or
    the eval follows at the next eval step)."""
    if eval_loss is None or triggers.size == 0 or len(eval_loss) == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.searchsorted(eval_loss.steps, triggers, side="left")
    return np.unique(eval_loss.steps[idx[idx < len(eval_loss)]]).astype(np.int64)


def render_png(curves: RunCurves, metrics: Sequence[str] = PLOT_METRICS) -> bytes:
    """The figure as PNG bytes: one panel per metric present in `curves`, eval loss on a twin axis.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        TelemetryError: none of `metrics` is in the log.
    """
    require("matplotlib", "plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [m for m in metrics if m in curves.structural and len(curves.structural[m])]
    if not shown:
        have = ", ".join(sorted(curves.structural)) or "none"
        raise TelemetryError(
            f"{curves.path}: none of {', '.join(metrics)} in the structural records (have: {have})"
        )
    width, height = _PANEL_INCHES
    fig = Figure(figsize=(width, height * len(shown) + 0.6), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, metric) in enumerate(zip(axes, shown, strict=True)):
        _panel(ax, curves, metric, legend=i == 0)
    axes[-1].set_xlabel("step")
    target = f"eval loss ({curves.eval_split})" if curves.eval_split else "no eval loss logged"
    fig.suptitle(f"{curves.run_id or Path(curves.path).name}: structure vs {target}", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _panel(ax: Any, curves: RunCurves, metric: str, legend: bool) -> None:
    s = curves.structural[metric]
    ax.plot(s.steps, s.values, color=_STRUCTURE_COLOR, marker=".", lw=1.5, label=metric)
    ax.set_ylabel(metric, color=_STRUCTURE_COLOR)
    ax.tick_params(axis="y", colors=_STRUCTURE_COLOR)
    ax.grid(alpha=0.3)
    for i, step in enumerate(curves.trigger_steps):
        ax.axvline(step, color=_TRIGGER_COLOR, ls=":", lw=1.0, alpha=0.8,
                   label="eval trigger" if i == 0 else None)  # fmt: skip
    handles, top = ax.get_legend_handles_labels()[0], ax
    loss = curves.eval_loss
    if loss is not None and len(loss):
        top = ax.twinx()  # drawn above `ax`, so the legend goes on it
        handles += _loss_curve(top, loss, curves)
    if legend:
        top.legend(handles=handles, loc="best", fontsize=8, framealpha=0.9)


def _loss_curve(twin: Any, loss: Series, curves: RunCurves) -> list[Any]:
    twin.plot(loss.steps, loss.values, color=_LOSS_COLOR, marker="o", ms=3.5, lw=1.2,
              label=f"eval loss ({curves.eval_split})")  # fmt: skip
    hit = np.isin(loss.steps, curves.triggered_eval_steps)
    if hit.any():
        twin.scatter(loss.steps[hit], loss.values[hit], s=80, facecolors="none",
                     edgecolors=_TRIGGER_COLOR, linewidths=1.8, zorder=3, label="triggered eval")  # fmt: skip
    twin.set_ylabel("eval loss", color=_LOSS_COLOR)
    twin.tick_params(axis="y", colors=_LOSS_COLOR)
    return list(twin.get_legend_handles_labels()[0])


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def default_out(path: str | os.PathLike[str], suffix: str) -> Path:
    """`runs/x/run.jsonl` -> `runs/x/run<suffix>`."""
    return Path(path).with_suffix(suffix)


def write_output(out: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `out` atomically (temp file beside it, then rename), creating folders."""
    target = Path(out)
    if target.is_dir():
        raise UsageError(f"{target} is a folder; give a file name for the output")
    target.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(target, data)
    return target


def plot_run(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    metrics: Sequence[str] = PLOT_METRICS,
    split: str | None = None,
) -> PlotResult:
    """Plot structural metrics and eval loss of one run log to a PNG file.

    Args:
        path: a `run.jsonl` written by Gradience telemetry.
        out: the PNG to write (atomically); default: the log's name with `.png`.
        metrics: structural metrics, one panel each (absent ones are skipped, with a note).
        split: eval split drawn; default: test, then eval, then validation.

    Returns:
        `PlotResult` with the file written and what it shows.

    Raises:
        UsageError: the log does not exist, or `out` is a folder.
        TelemetryError: no structural records, or none of `metrics` in them.
        MissingDependencyError: matplotlib is not installed (`pip install gradience[plot]`).

    Example:
        >>> plot_run("runs/toy/run.jsonl", "runs/toy/run.png").n_evals  # doctest: +SKIP
        6
    """
    require("matplotlib", "plot")
    curves = read_curves(path, split)
    data = render_png(curves, metrics)
    target = write_output(out if out is not None else default_out(path, ".png"), data)
    return result_of(curves, metrics, str(target), data)


def result_of(curves: RunCurves, metrics: Sequence[str], out: str, data: bytes) -> PlotResult:
    """The `PlotResult` of PNG bytes rendered from `curves`."""
    shown = tuple(m for m in metrics if m in curves.structural and len(curves.structural[m]))
    notes = list(curves.notes)
    if missing := [m for m in metrics if m not in shown]:
        notes.append(f"not in the structural records, not plotted: {', '.join(missing)}")
    if curves.eval_loss is None:
        notes.append("no eval loss in this log; structure only")
    width, height = png_size(data)
    n_struct = max((len(s) for s in curves.structural.values()), default=0)
    return PlotResult(
        path=curves.path, out=out, metrics=shown, eval_split=curves.eval_split,
        n_structural=n_struct, n_evals=len(curves.eval_loss) if curves.eval_loss else 0,
        n_triggers=int(curves.trigger_steps.size),
        n_triggered_evals=int(curves.triggered_eval_steps.size),
        width_px=width, height_px=height, bytes=len(data), notes=tuple(notes),
    )  # fmt: skip
