"""`gradience report`: one self-contained HTML file with the monitor, audit, analysis and plots."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._output import emit_json, hint
from gradience.runlog.report_html import build_report


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="write one offline HTML report: monitor, audit, analysis, plots")
    p.add_argument("run_jsonl", metavar="RUN.jsonl", help="run log written by the Gradience callback")
    p.add_argument("-o", "--out", metavar="FILE.html", help="HTML to write (default: the log's name with .html)")
    p.add_argument("--json", action="store_true", help="print the ReportResult as JSON")
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    result = build_report(args.run_jsonl, args.out)
    if args.json:
        emit_json(result)
        return 0
    print(f"Wrote {result.out} ({result.bytes} bytes): {', '.join(result.sections)}")
    for section, why in result.unavailable.items():
        hint(f"note: {section} left out: {why}")
    return 0
