"""Drawing the figure of `plot.py` with matplotlib (imported here, on the Agg canvas only).

Layout: the loss panel, one panel per structural metric, then the per-layer heatmap; the
step axis is shared. Legends are placed right of the axes (constrained layout makes room),
so no legend covers data. Trigger evals are vertical lines, one style per reason.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradience.runlog.plot import RunCurves, overlay_title

DPI = 100
WIDTH_IN, PANEL_IN, LOSS_IN = 11.0, 1.9, 2.6
_EVAL, _TRAIN, _TRAIN_EVAL, _STRUCTURE = "#d62728", "#7f7f7f", "#ff7f0e", "#1f77b4"
_RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
# One look per trigger reason; unknown reasons (older logs) fall back to the last.
_REASON_STYLE: dict[str, tuple[str, str]] = {
    "nonfinite": ("#000000", "-"), "divergence": ("#d62728", "-"), "regime_change": ("#9467bd", "-."),
    "plateau_entry": ("#2ca02c", "--"), "plateau": ("#2ca02c", "--"), "max_spacing": ("#8c8c8c", ":"),
    "final": ("#17becf", ":"), "trigger": ("#2ca02c", ":"),
}  # fmt: skip
_LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "frameon": False,
           "borderaxespad": 0.0}  # fmt: skip


def draw(runs: Sequence[RunCurves], metrics: Sequence[str], heatmap: bool = True) -> bytes:
    """PNG bytes of one run (with its heatmap) or several overlaid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [m for m in metrics if any(m in c.structural and len(c.structural[m]) for c in runs)]
    one = runs[0]
    with_heatmap = heatmap and len(runs) == 1 and one.heatmap.size > 0
    ratios = [LOSS_IN] + [PANEL_IN] * len(shown) + ([_heatmap_inches(one)] if with_heatmap else [])
    fig = Figure(figsize=(WIDTH_IN, sum(ratios) + 0.7), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ratios), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    if len(runs) == 1:
        _loss_panel(axes[0], one)
        for ax, metric in zip(axes[1:], shown, strict=False):
            _structure_panel(ax, one, metric)
        if with_heatmap:
            _heatmap_panel(fig, axes[-1], one)
        fig.suptitle(one.title, fontsize=12, fontweight="bold")
    else:
        _overlay(list(axes), runs, shown)
        fig.suptitle(overlay_title(runs), fontsize=12, fontweight="bold")
    axes[-1].set_xlabel("optimizer step")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _heatmap_inches(c: RunCurves) -> float:
    return float(min(4.5, max(1.6, 0.16 * len(c.heatmap_rows) + 0.6)))


def _triggers(ax: Any, c: RunCurves, label: bool) -> None:
    """Vertical lines at trigger steps, one legend entry per reason when `label`."""
    seen: set[str] = set()
    for step, reason in sorted(c.trigger_reasons.items()):
        color, style = _REASON_STYLE.get(reason, _REASON_STYLE["trigger"])
        first = reason not in seen
        seen.add(reason)
        ax.axvline(step, color=color, ls=style, lw=1.1, alpha=0.75,
                   label=f"trigger: {reason}" if label and first else None)  # fmt: skip


def _loss_panel(ax: Any, c: RunCurves) -> None:
    if c.train_loss is not None and len(c.train_loss):
        ax.plot(c.train_loss.steps, c.train_loss.values, color=_TRAIN, lw=0.9, alpha=0.8, label="train loss (logged)")
    if c.train_eval_loss is not None and len(c.train_eval_loss):
        ax.plot(c.train_eval_loss.steps, c.train_eval_loss.values, color=_TRAIN_EVAL, marker=".", lw=1.3,
                label="train-split eval loss")  # fmt: skip
    if c.eval_loss is not None and len(c.eval_loss):
        loss = c.eval_loss
        ax.plot(loss.steps, loss.values, color=_EVAL, marker="o", ms=3.5, lw=1.6, label=f"eval loss ({c.eval_split})")
        _gap(ax, c)
        hit = np.isin(loss.steps, c.triggered_eval_steps)
        if hit.any():
            ax.scatter(loss.steps[hit], loss.values[hit], s=90, facecolors="none", edgecolors="#2ca02c",
                       linewidths=1.6, zorder=3, label="eval a trigger asked for")  # fmt: skip
    _triggers(ax, c, label=True)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**_LEGEND)


def _gap(ax: Any, c: RunCurves) -> None:
    """Shade eval loss minus the train reference (the train-split eval, else the logged train
    loss interpolated at the eval steps); the legend gives the last gap."""
    loss = c.eval_loss
    ref = c.train_eval_loss if c.train_eval_loss is not None and len(c.train_eval_loss) else c.train_loss
    if loss is None or ref is None or len(ref) < 1:
        return
    inside = (loss.steps >= ref.steps[0]) & (loss.steps <= ref.steps[-1])
    if inside.sum() < 2:
        return
    steps, top = loss.steps[inside], loss.values[inside]
    base = np.interp(steps, ref.steps, ref.values)
    # The last gap goes in the legend (outside the axes), so no label sits on the curves.
    ax.fill_between(steps, base, top, color=_EVAL, alpha=0.12, lw=0,
                    label=f"gap (eval - train), last {top[-1] - base[-1]:+.3f}")  # fmt: skip


def _structure_panel(ax: Any, c: RunCurves, metric: str) -> None:
    s = c.structural.get(metric)
    if s is not None and len(s):
        ax.plot(s.steps, s.values, color=_STRUCTURE, marker=".", lw=1.5)
    _triggers(ax, c, label=False)
    ax.set_ylabel(metric.replace("_", " "), fontsize=9)
    ax.grid(alpha=0.3)


def _heatmap_panel(fig: Any, ax: Any, c: RunCurves) -> None:
    steps, grid = c.heatmap_steps, np.ma.masked_invalid(c.heatmap)
    # Cell edges halfway between snapshots, so each column sits on its step.
    edges = np.concatenate([[steps[0] - (steps[1] - steps[0]) / 2 if len(steps) > 1 else steps[0] - 0.5],
                            (steps[:-1] + steps[1:]) / 2,
                            [steps[-1] + (steps[-1] - steps[-2]) / 2 if len(steps) > 1 else steps[-1] + 0.5]])  # fmt: skip
    rows = np.arange(len(c.heatmap_rows) + 1) - 0.5
    mesh = ax.pcolormesh(edges, rows, grid, cmap="viridis", shading="flat")
    ax.set_ylim(rows[-1], rows[0])  # layer 0 on top
    tick = max(1, len(c.heatmap_rows) // 12)
    ax.set_yticks(range(0, len(c.heatmap_rows), tick))
    ax.set_yticklabels(c.heatmap_rows[::tick], fontsize=7)
    ax.set_ylabel(f"per layer:\n{c.heatmap_metric.replace('_', ' ')}", fontsize=9)
    cax = ax.inset_axes((1.01, 0.0, 0.015, 1.0))  # in the legend column, beside its own panel
    fig.colorbar(mesh, cax=cax)


def _overlay(axes: Sequence[Any], runs: Sequence[RunCurves], shown: Sequence[str]) -> None:
    for i, c in enumerate(runs):
        color = _RUN_COLORS[i % len(_RUN_COLORS)]
        if c.train_loss is not None and len(c.train_loss):
            axes[0].plot(c.train_loss.steps, c.train_loss.values, color=color, lw=0.8, alpha=0.35)
        if c.eval_loss is not None and len(c.eval_loss):
            axes[0].plot(c.eval_loss.steps, c.eval_loss.values, color=color, marker="o", ms=3, lw=1.6,
                         label=f"{c.run_name}: eval loss ({c.eval_split})")  # fmt: skip
        for ax, metric in zip(axes[1:], shown, strict=False):
            s = c.structural.get(metric)
            if s is not None and len(s):
                ax.plot(s.steps, s.values, color=color, marker=".", lw=1.4, label=c.run_name)
    axes[0].plot([], [], color="#7f7f7f", lw=0.8, alpha=0.6, label="train loss (logged, faint)")
    axes[0].set_ylabel("loss")
    axes[0].legend(**_LEGEND)
    for ax, metric in zip(axes[1:], shown, strict=False):
        ax.set_ylabel(metric.replace("_", " "), fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
