"""Plots of run logs a practitioner reads at a glance, drawn from the log alone.

One figure, panels sharing the step axis, top to bottom:

- losses: train loss (`train_step`), one eval-loss line (one held-out split), the train
  split's eval loss when logged, and the gap between eval and train shaded;
- one panel per structural metric (whole-adapter values of the `structural` records);
- a per-layer x step heatmap of one structural metric, from the per-module values every
  structural record carries (modules grouped by their layer index).

Every panel marks the trigger evals (`metrics` records of kind `eval_trigger`) as vertical
lines styled by reason, and the eval each trigger caused is ringed. Legends sit outside the
axes, so they cover no data. The title names the model, the task and the run. Several logs
overlay: one colour per run, losses and structure only (`plot_runs`).

matplotlib (`pip install gradience[plot]`) is imported inside the drawing module
(`plot_draw.py`); importing this one needs numpy only. Figures are drawn on the Agg canvas
directly, never through pyplot, so no global backend is switched and nothing opens a window.

    from gradience.runlog.plot import plot_run

    result = plot_run("runs/toy/run.jsonl", "runs/toy/run.png")
    print(result.title, result.n_evals)
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradience._io import replace_atomic
from gradience.analysis.align import Series, choose_split
from gradience.errors import TelemetryError, UsageError, require
from gradience.integrations.trigger import TRIGGER_KIND
from gradience.telemetry import ReadProblems, iter_records

PLOT_METRICS: tuple[str, ...] = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90")
HEATMAP_METRIC = "frobenius_norm"
TRAIN_SPLITS = ("train", "training")  # a held-out eval of training data: the like-for-like train loss
MAX_HEATMAP_ROWS = 48  # rows beyond this (modules of an unlayered adapter) are left out, with a note
# `...layer.3.`, `...layers.12.`, `...h.0.`, `...blocks.7.`, `...block.2.`: the layer index of a module path
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|block)\.(\d+)\.")


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
    title: str = ""
    run_name: str = ""
    train_loss: Series | None = None  # train_step losses
    train_eval_loss: Series | None = None  # eval on a train split, when logged
    trigger_reasons: dict[int, str] = field(default_factory=dict)  # step -> reason (the first at a step)
    heatmap_metric: str = HEATMAP_METRIC
    heatmap_rows: tuple[str, ...] = ()  # "layer 0", ... or module names
    heatmap_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    heatmap: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # rows x steps, NaN where absent


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
    title: str = ""
    paths: tuple[str, ...] = ()  # every log drawn (more than one: an overlay)
    heatmap_metric: str | None = None
    heatmap_rows: int = 0
    trigger_reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("metrics", "notes", "paths"):
            out[key] = list(getattr(self, key))
        return out


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
        return float(v)
    return None


def _is_trigger(event: str, data: dict[str, Any]) -> bool:
    if event == "metrics" and data.get("kind") == TRIGGER_KIND:
        return True
    return event in ("eval", "metrics") and (data.get("reason") == "trigger" or data.get("trigger") is True)


def layer_of(module: str) -> int | None:
    """The layer index in a module path, or None.

    Example:
        >>> layer_of("base_model.model.bert.encoder.layer.3.attention.self.query")
        3
    """
    found = _LAYER.findall(module)
    return int(found[-1]) if found else None


def _short(name: str) -> str:
    """`org/Model-Name (package x)` -> `Model-Name`."""
    return name.split(" (")[0].rstrip("/").rsplit("/", 1)[-1]


def run_title(start: dict[str, Any] | None, path: str, run_id: str | None) -> tuple[str, str]:
    """(title, run name): model, task and run, from `run_start` and the log's place."""
    start = start or {}
    model: dict[str, Any] = start["model"] if isinstance(start.get("model"), dict) else {}
    data: dict[str, Any] = start["dataset"] if isinstance(start.get("dataset"), dict) else {}
    p = Path(path)
    name = p.parent.name if p.name == "run.jsonl" and p.parent.name else p.stem
    run = str(start.get("run_name") or name or run_id or "run")
    task = data.get("task") or data.get("name") or start.get("task_profile")
    parts = [_short(str(model["name"])) if model.get("name") else None, str(task) if task else None, run]
    return " · ".join(x for x in parts if x), run


def read_curves(path: str | os.PathLike[str], split: str | None = None,
                heatmap_metric: str = HEATMAP_METRIC) -> RunCurves:  # fmt: skip
    """Stream a run log into the series the plot draws.

    Args:
        path: a `run.jsonl` written by Gradience telemetry.
        split: eval split whose loss is drawn; default: test, then eval, then validation.
        heatmap_metric: structural metric of the per-layer heatmap (from per-module values).

    Returns:
        `RunCurves`; later records at a repeated step replace earlier ones.

    Raises:
        UsageError: the file does not exist.
        TelemetryError: the log has no structural records (`metrics` of kind `structural`).
    """
    problems = ReadProblems(path)
    structural: dict[str, dict[int, float]] = {}
    losses: dict[str, dict[int, float]] = {}
    train: dict[int, float] = {}
    modules: dict[str, dict[int, float]] = {}
    reasons: dict[int, str] = {}
    run_id, n_structural, start = None, 0, None
    for rec in iter_records(path, problems=problems):
        run_id = run_id or rec.run_id
        data, step = rec.data, rec.step
        if rec.event == "run_start" and start is None:
            start = data
        if step is None:
            continue
        if _is_trigger(rec.event, data):
            reasons.setdefault(step, str(data.get("reason") or "trigger"))
        metrics: dict[str, Any] = data["metrics"] if isinstance(data.get("metrics"), dict) else {}
        if rec.event == "metrics" and data.get("kind") == "structural":
            n_structural += 1
            for name, value in metrics.items():
                if (v := _number(value)) is not None:
                    structural.setdefault(name, {})[step] = v
            per = data.get("modules")
            for module, values in (per.items() if isinstance(per, dict) else ()):
                if isinstance(values, dict) and (v := _number(values.get(heatmap_metric))) is not None:
                    modules.setdefault(str(module), {})[step] = v
        elif rec.event == "eval" and isinstance(data.get("split"), str):
            loss = _number(metrics.get("loss", metrics.get("eval_loss")))
            if loss is not None:
                losses.setdefault(data["split"], {})[step] = loss
        elif rec.event == "train_step" and (v := _number(data.get("loss"))) is not None:
            train[step] = v
    if n_structural == 0:
        raise TelemetryError(
            f"{path}: no structural records (`metrics` events of kind `structural`) to plot; "
            "log them with GradienceCallback(structural_interval=N)"
        )
    held_out = {k: v for k, v in losses.items() if k not in TRAIN_SPLITS} or losses
    chosen = choose_split(tuple(held_out), split, str(path)) if held_out or split else None
    eval_loss = Series.from_points("eval_loss", losses[chosen]) if chosen else None
    train_split = next((k for k in TRAIN_SPLITS if k in losses and k != chosen), None)
    trigger_steps = np.array(sorted(reasons), dtype=np.int64)
    title, run_name = run_title(start, str(path), run_id)
    rows, hsteps, grid, notes = _heatmap(modules, heatmap_metric)
    return RunCurves(
        path=str(path), run_id=run_id,
        structural={k: Series.from_points(k, v) for k, v in structural.items()},
        eval_split=chosen, eval_loss=eval_loss, trigger_steps=trigger_steps,
        triggered_eval_steps=_triggered_evals(trigger_steps, eval_loss),
        notes=tuple(problems.messages()) + notes, title=title, run_name=run_name,
        train_loss=Series.from_points("train_loss", train) if train else None,
        train_eval_loss=Series.from_points("train_eval_loss", losses[train_split]) if train_split else None,
        trigger_reasons=reasons, heatmap_metric=heatmap_metric, heatmap_rows=rows,
        heatmap_steps=hsteps, heatmap=grid,
    )  # fmt: skip


def _heatmap(modules: dict[str, dict[int, float]], metric: str
             ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, tuple[str, ...]]:  # fmt: skip
    """Per-layer rows (modules with a layer index grouped; else one row per module) x steps.

    A layer's value combines its modules as the whole-adapter value does (DESIGN.md):
    frobenius_norm the root of the summed squares, sigma_max the max, the rest the mean.
    """
    if not modules:
        return (), np.zeros(0, dtype=np.int64), np.zeros((0, 0)), ()
    steps = np.array(sorted({s for v in modules.values() for s in v}), dtype=np.int64)
    col = {int(s): i for i, s in enumerate(steps)}
    groups: dict[Any, list[str]] = {}
    for name in modules:
        layer = layer_of(name)
        groups.setdefault(layer if layer is not None else name, []).append(name)
    layered = all(isinstance(k, int) for k in groups)
    keys = sorted(groups, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else 0, str(k)))
    notes: tuple[str, ...] = ()
    if len(keys) > MAX_HEATMAP_ROWS:
        notes = (f"heatmap: {len(keys)} rows, the first {MAX_HEATMAP_ROWS} drawn",)
        keys = keys[:MAX_HEATMAP_ROWS]
    grid = np.full((len(keys), len(steps)), np.nan)
    for r, key in enumerate(keys):
        block = np.full((len(groups[key]), len(steps)), np.nan)
        for m, name in enumerate(groups[key]):
            for s, v in modules[name].items():
                block[m, col[s]] = v
        with np.errstate(all="ignore"):
            if metric == "frobenius_norm":
                grid[r] = np.sqrt(np.nansum(block**2, axis=0))
            elif metric == "sigma_max":
                grid[r] = np.nanmax(np.where(np.isnan(block), -np.inf, block), axis=0)
            else:
                grid[r] = np.nanmean(block, axis=0)
        grid[r, np.isnan(block).all(axis=0)] = np.nan
    rows = tuple(f"layer {k}" if layered else str(k) for k in keys)
    return rows, steps, grid, notes


def _triggered_evals(triggers: np.ndarray, eval_loss: Series | None) -> np.ndarray:
    """The first eval at or after each trigger step (an eval and its trigger share a step, or
    the eval follows at the next eval step)."""
    if eval_loss is None or triggers.size == 0 or len(eval_loss) == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.searchsorted(eval_loss.steps, triggers, side="left")
    return np.unique(eval_loss.steps[idx[idx < len(eval_loss)]]).astype(np.int64)


def render_png(curves: RunCurves | Sequence[RunCurves], metrics: Sequence[str] = PLOT_METRICS,
               heatmap: bool = True) -> bytes:  # fmt: skip
    """The figure as PNG bytes; several `curves` overlay (losses and structure, no heatmap).

    Raises:
        MissingDependencyError: matplotlib is not installed.
        TelemetryError: none of `metrics` is in the log(s).
    """
    require("matplotlib", "plot")
    from gradience.runlog.plot_draw import draw

    runs = [curves] if isinstance(curves, RunCurves) else list(curves)
    if not any(m in c.structural and len(c.structural[m]) for c in runs for m in metrics):
        have = ", ".join(sorted({k for c in runs for k in c.structural})) or "none"
        raise TelemetryError(
            f"{runs[0].path}: none of {', '.join(metrics)} in the structural records (have: {have})"
        )
    return draw(runs, metrics, heatmap=heatmap and len(runs) == 1)


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
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    metrics: Sequence[str] = PLOT_METRICS,
    split: str | None = None,
    heatmap_metric: str = HEATMAP_METRIC,
) -> PlotResult:
    """Plot one run log (or overlay several) to a PNG file.

    Args:
        path: a `run.jsonl` written by Gradience telemetry, or a list of them to overlay.
        out: the PNG to write (atomically); default: the (first) log's name with `.png`.
        metrics: structural metrics, one panel each (absent ones are skipped, with a note).
        split: eval split drawn; default: test, then eval, then validation.
        heatmap_metric: structural metric of the per-layer heatmap (single run only).

    Returns:
        `PlotResult` with the file written and what it shows.

    Raises:
        UsageError: a log does not exist, or `out` is a folder.
        TelemetryError: no structural records, or none of `metrics` in them.
        MissingDependencyError: matplotlib is not installed (`pip install gradience[plot]`).

    Example:
        >>> plot_run("runs/toy/run.jsonl", "runs/toy/run.png").n_evals  # doctest: +SKIP
        13
        >>> plot_run(["runs/a/run.jsonl", "runs/b/run.jsonl"], "ab.png").paths  # doctest: +SKIP
        ('runs/a/run.jsonl', 'runs/b/run.jsonl')
    """
    require("matplotlib", "plot")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise UsageError("no run log given")
    runs = [read_curves(p, split, heatmap_metric) for p in paths]
    data = render_png(runs, metrics)
    target = write_output(out if out is not None else default_out(paths[0], ".png"), data)
    return result_of(runs, metrics, str(target), data)


def result_of(curves: RunCurves | Sequence[RunCurves], metrics: Sequence[str], out: str, data: bytes) -> PlotResult:
    """The `PlotResult` of PNG bytes rendered from `curves` (one run, or the runs overlaid)."""
    runs = [curves] if isinstance(curves, RunCurves) else list(curves)
    first = runs[0]
    shown = tuple(m for m in metrics if any(m in c.structural and len(c.structural[m]) for c in runs))
    notes = [n for c in runs for n in c.notes]
    if missing := [m for m in metrics if m not in shown]:
        notes.append(f"not in the structural records, not plotted: {', '.join(missing)}")
    if first.eval_loss is None:
        notes.append("no eval loss in this log; structure only")
    if len(runs) == 1 and not first.heatmap_rows:
        notes.append(f"no per-module {first.heatmap_metric} in the structural records; no heatmap")
    reasons: dict[str, int] = {}
    for c in runs:
        for r in c.trigger_reasons.values():
            reasons[r] = reasons.get(r, 0) + 1
    width, height = png_size(data)
    n_struct = max((len(s) for s in first.structural.values()), default=0)
    title = first.title if len(runs) == 1 else overlay_title(runs)
    return PlotResult(
        path=first.path, out=out, metrics=shown, eval_split=first.eval_split,
        n_structural=n_struct, n_evals=len(first.eval_loss) if first.eval_loss else 0,
        n_triggers=int(first.trigger_steps.size),
        n_triggered_evals=int(first.triggered_eval_steps.size),
        width_px=width, height_px=height, bytes=len(data), notes=tuple(notes), title=title,
        paths=tuple(c.path for c in runs),
        heatmap_metric=first.heatmap_metric if len(runs) == 1 and first.heatmap_rows else None,
        heatmap_rows=len(first.heatmap_rows) if len(runs) == 1 else 0, trigger_reasons=reasons,
    )  # fmt: skip


def overlay_title(runs: Sequence[RunCurves]) -> str:
    """`N runs: a vs b` plus what they share (model, task) from the first title."""
    names = " vs ".join(c.run_name for c in runs)
    shared = runs[0].title.rsplit(" · ", 1)[0] if " · " in runs[0].title else ""
    return f"{shared} · {names}" if shared else names
