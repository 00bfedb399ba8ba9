"""`gradience report`: one self-contained HTML file with the plots, monitor, triggers, audit, check and analysis."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import add_log_argument, resolve_log
from gradience.cli._output import emit_json, hint
from gradience.runlog.report_html import build_report


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="write one offline HTML report: plots, monitor, triggers, audit, check, analysis",
        description="Write one self-contained HTML file (no scripts, no links) for a run: the plots, "
        "the monitor summary, the trigger evals and their savings, and, when the adapter and the "
        "training settings sit beside the log (peft/, training/), its audit and pre-flight check; "
        "then the structure-vs-eval-loss analysis.",
    )
    add_log_argument(p)
    p.add_argument("-o", "--out", metavar="FILE.html", help="HTML to write (default: the log's name with .html)")
    p.add_argument("--json", action="store_true", help="print the ReportResult as JSON")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    result = build_report(resolve_log(args.run_jsonl), args.out)
    if args.json:
        emit_json(result)
        return 0
    print(f"Wrote {result.out} ({result.bytes} bytes): {', '.join(result.sections)}")
    for section, why in result.unavailable.items():
        hint(f"note: {section} left out: {why}")
    return 0
