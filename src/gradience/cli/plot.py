"""`gradience plot`: structural metrics and eval loss of a run log against step, as a PNG."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._output import emit_json, hint
from gradience.runlog.plot import PLOT_METRICS, PlotResult, plot_run


def register(sub: Any) -> None:
    p = sub.add_parser("plot", help="plot structural metrics and eval loss against step (PNG)")
    p.add_argument("run_jsonl", metavar="RUN.jsonl", help="run log written by the Gradience callback")
    p.add_argument("-o", "--out", metavar="FILE.png", help="PNG to write (default: the log's name with .png)")
    p.add_argument("--metrics", nargs="+", default=list(PLOT_METRICS), metavar="NAME",
                   help=f"structural metrics, one panel each (default: {' '.join(PLOT_METRICS)})")
    p.add_argument("--split", help="eval split whose loss is drawn (default: test, then eval, then validation)")
    p.add_argument("--json", action="store_true", help="print the PlotResult as JSON")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    metrics = [m for arg in args.metrics for m in arg.split(",") if m]
    result = plot_run(args.run_jsonl, args.out, metrics, args.split)
    if args.json:
        emit_json(result)
    else:
        print(render(result))
        for note in result.notes:
            hint(f"note: {note}")
    return 0


def render(r: PlotResult) -> str:
    evals = f"{r.n_evals} evals on `{r.eval_split}`" if r.eval_split else "no eval loss"
    return (f"Wrote {r.out} ({r.width_px}x{r.height_px} px): {', '.join(r.metrics)}; "
            f"{r.n_structural} snapshots, {evals}, {r.n_triggers} triggers")  # fmt: skip
