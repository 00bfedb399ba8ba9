"""The one table from an exception a user can meet to a one-line message and an exit code.

`main()` looks every exception up here; a row says what the user sees (`Error: ...` on
stderr) and the exit code. Anything not in the table is a bug and keeps its traceback.
`tests/test_cli_errors.py` has one test per row.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from gradience.errors import GradienceError

# json.dumps(..., allow_nan=False) raises ValueError with this text.
_NON_FINITE_JSON = "Out of range float values are not JSON compliant"


@dataclass(frozen=True)
class ErrorRow:
    """One kind of failure: which exceptions it covers, what the user reads, the exit code."""

    name: str
    matches: Callable[[BaseException], bool]
    message: Callable[[BaseException], str | None]  # None: print nothing
    exit_code: Callable[[BaseException], int]


def _where(exc: BaseException) -> str:
    name = getattr(exc, "filename", None)
    return f"{name}: " if name else ""


def _is_os(code: int) -> Callable[[BaseException], bool]:
    return lambda e: isinstance(e, OSError) and e.errno == code


def _one(code: int) -> Callable[[BaseException], int]:
    return lambda e: code


TABLE: tuple[ErrorRow, ...] = (
    ErrorRow("interrupt", lambda e: isinstance(e, KeyboardInterrupt), lambda e: "Interrupted.", _one(130)),
    # `gradience ... | head` closes stdout early: not an error.
    ErrorRow("broken_pipe", lambda e: isinstance(e, BrokenPipeError), lambda e: None, _one(0)),
    ErrorRow("gradience", lambda e: isinstance(e, GradienceError), str, lambda e: int(getattr(e, "exit_code", 1))),
    ErrorRow("not_a_directory", lambda e: isinstance(e, NotADirectoryError) or _is_os(errno.ENOTDIR)(e),
             lambda e: f"{_where(e)}a path component is not a directory", _one(1)),
    ErrorRow("is_a_directory", lambda e: isinstance(e, IsADirectoryError),
             lambda e: f"{_where(e)}is a directory, expected a file", _one(1)),
    ErrorRow("not_found", lambda e: isinstance(e, FileNotFoundError), lambda e: f"{_where(e)}no such file or directory",
             _one(1)),
    ErrorRow("permission", lambda e: isinstance(e, PermissionError),
             lambda e: f"{_where(e)}permission denied (check the file's owner and mode)", _one(1)),
    ErrorRow("disk_full", _is_os(errno.ENOSPC),
             lambda e: f"{_where(e)}no space left on device; nothing was replaced, free space and run again", _one(1)),
    ErrorRow("read_only", _is_os(errno.EROFS), lambda e: f"{_where(e)}read-only file system", _one(1)),
    ErrorRow("os", lambda e: isinstance(e, OSError), lambda e: f"{_where(e)}{getattr(e, 'strerror', None) or e}", _one(1)),
    ErrorRow("non_finite_json", lambda e: isinstance(e, ValueError) and _NON_FINITE_JSON in str(e),
             lambda e: "a result holds NaN or Inf, which JSON cannot carry; nothing was printed", _one(1)),
    ErrorRow("out_of_memory", lambda e: isinstance(e, MemoryError),
             lambda e: "out of memory (try a smaller input, or --workers 1)", _one(1)),
)


def lookup(exc: BaseException) -> ErrorRow | None:
    """The first row that covers `exc`, or None (a bug: let the traceback show)."""
    return next((row for row in TABLE if row.matches(exc)), None)
