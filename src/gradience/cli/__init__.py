"""The `gradience` command: thin wiring over the library, one module per command.

Exit codes: 0 ok, 1 bad data or a failed check, 2 bad usage. Tracebacks only with --debug.
"""

from __future__ import annotations

import os

# The audit path runs many small QRs (n × r with r ≤ a few hundred): BLAS threads buy nothing
# there and, on a busy machine, oversubscription made each QR ~100× slower. Set before numpy
# loads; a user's own setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import sys
import traceback
from collections.abc import Sequence

from gradience import __version__
from gradience.cli import analyze as analyze_cmd
from gradience.cli import audit as audit_cmd
from gradience.cli import bench as bench_cmd
from gradience.cli import check as check_cmd
from gradience.cli import compare as compare_cmd
from gradience.cli import compress as compress_cmd
from gradience.cli import explain as explain_cmd
from gradience.cli import merge as merge_cmd
from gradience.cli import monitor as monitor_cmd
from gradience.cli import plot as plot_cmd
from gradience.cli import report as report_cmd
from gradience.errors import GradienceError

COMMANDS = [audit_cmd, explain_cmd, check_cmd, monitor_cmd, analyze_cmd, plot_cmd, report_cmd, compress_cmd,
            compare_cmd, merge_cmd, bench_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradience",
        description="Flight recorder and mechanic for LoRA fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gradience {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GradienceError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    sys.exit(main())
