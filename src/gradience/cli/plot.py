"""`gradience plot`: losses, structure and a per-layer heatmap of a run log as a PNG; several logs overlay."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import add_log_argument, check_names, resolve_log, split_names
from gradience.cli._output import emit_json, hint
from gradience.runlog.monitor_report import STRUCTURAL_KEYS
from gradience.runlog.plot import HEATMAP_METRIC, PLOT_METRICS, PlotResult, plot_run


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plot", help="plot losses, structure and a per-layer heatmap against step (PNG); several runs overlay",
        description="Draw a run log as one PNG: train and eval loss with their gap, one panel per "
        "structural metric, a per-layer x step heatmap from the per-module records, and the trigger "
        "evals by reason. Several logs overlay (one colour per run).",
    )
    add_log_argument(p, many=True)
    p.add_argument("-o", "--out", metavar="FILE.png", help="PNG to write (default: the (first) log's name with .png)")
    p.add_argument("--metrics", nargs="+", default=list(PLOT_METRICS), metavar="NAME",
                   help=f"structural metrics, one panel each (default: {' '.join(PLOT_METRICS)})")
    p.add_argument("--heatmap-metric", default=HEATMAP_METRIC, metavar="NAME",
                   help=f"structural metric of the per-layer heatmap (default: {HEATMAP_METRIC})")
    p.add_argument("--split", help="eval split whose loss is drawn (default: test, then eval, then validation)")
    p.add_argument("--json", action="store_true", help="print the PlotResult as JSON")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    metrics = check_names(split_names(args.metrics), STRUCTURAL_KEYS, "structural metric")
    heatmap = check_names([args.heatmap_metric], STRUCTURAL_KEYS, "structural metric")[0]
    result = plot_run([resolve_log(r) for r in args.runs], args.out, metrics, args.split, heatmap)
    if args.json:
        emit_json(result)
    else:
        print(render(result))
        for note in result.notes:
            hint(f"note: {note}")
    return 0


def render(r: PlotResult) -> str:
    evals = f"{r.n_evals} evals on `{r.eval_split}`" if r.eval_split else "no eval loss"
    runs = f"{len(r.paths)} runs overlaid; " if len(r.paths) > 1 else ""
    heat = f", per-layer {r.heatmap_metric} ({r.heatmap_rows} rows)" if r.heatmap_metric else ""
    n = r.n_triggers
    return (f"Wrote {r.out} ({r.width_px}x{r.height_px} px): {r.title}; {runs}{', '.join(r.metrics)}{heat}; "
            f"{r.n_structural} snapshots, {evals}, {n} trigger{'' if n == 1 else 's'}")  # fmt: skip
