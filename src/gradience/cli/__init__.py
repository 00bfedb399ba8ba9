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
import importlib
import sys
import traceback
from collections.abc import Sequence

from gradience import __version__
from gradience.cli._errors import lookup

# One module per command under gradience.cli, in help order. A run imports only the module
# of the command it names, so `gradience audit` does not pay for analyze's scipy import.
COMMANDS = ("audit", "explain", "check", "monitor", "analyze", "plot", "report", "compress",
            "compare", "merge", "bench")  # fmt: skip


def _named_command(argv: Sequence[str]) -> str | None:
    """The command an argument list names (options before it skipped), or None."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with just `only` (what a run needs)."""
    parser = argparse.ArgumentParser(
        prog="gradience",
        description="Flight recorder and mechanic for LoRA fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"gradience {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in [only] if only else COMMANDS:
        importlib.import_module(f"gradience.cli.{name}").register(sub)
    return parser


def _pop_debug(argv: list[str]) -> bool:
    """Remove every `--debug` before a `--` (it may come before or after the command name)."""
    end = argv.index("--") if "--" in argv else len(argv)
    found = "--debug" in argv[:end]
    argv[:end] = [a for a in argv[:end] if a != "--debug"]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it).

    Every exception a user can meet goes through the table in `gradience.cli._errors`: one
    line on stderr and its exit code; `--debug` adds the traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _pop_debug(argv)
    try:
        parser = build_parser(_named_command(argv))
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        row = lookup(exc)
        if row is None:
            raise
        if debug:
            traceback.print_exc()
        message = row.message(exc)
        if message:
            print(message if row.name == "interrupt" else f"Error: {message}", file=sys.stderr)
        return row.exit_code(exc)


def entry() -> None:
    sys.exit(main())
