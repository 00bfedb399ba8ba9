"""Streaming, tolerant reader for `run.jsonl`.

Logs come from crashed runs, older or newer Gradience versions and hand edits, so by default
a bad line is skipped and reported (with its line number) instead of ending the read.
Lines are parsed one at a time; a million-line log never sits in memory unless you ask for
it with `read_run`.
"""

from __future__ import annotations

import json
import os
import warnings
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradience.errors import TelemetryError, UsageError
from gradience.telemetry.schema import (
    ENVELOPE_FIELDS,
    SCHEMA,
    SCHEMA_MAJOR,
    SCHEMA_NAME,
    parse_schema,
)

_ENVELOPE = frozenset(ENVELOPE_FIELDS)
_NOT_PARSED = object()
_TAIL_CHUNK = 1 << 16
_MAX_LISTED = 5


@dataclass(frozen=True, slots=True)
class Record:
    """One valid line of a run log: envelope fields up front, the whole object in `data`.

    `line_no` is 1-based; it is 0 for a record found by `read_last_record`, which reads
    only the file's tail and so cannot number lines.
    """

    line_no: int
    seq: int
    step: int | None
    event: str
    ts: float
    run_id: str
    data: dict[str, Any]


@dataclass
class _Tally:
    detail: str
    lines: array[int] = field(default_factory=lambda: array("q"))


class ReadProblems:
    """Collects what a tolerant read skipped or noticed, summarised per kind of problem.

    Why per kind: a damaged million-line file should give a few messages, not a million.
    `lines` still lists every skipped line number (8 bytes each).
    """

    def __init__(self, path: str | os.PathLike[str] = "") -> None:
        self.path = str(path)
        self._skipped: dict[str, _Tally] = {}
        self._notes: dict[str, _Tally] = {}

    def add(self, line_no: int, kind: str, detail: str = "") -> None:
        """Record that line `line_no` was skipped because of `kind`."""
        tally = self._skipped.get(kind)
        if tally is None:
            tally = self._skipped[kind] = _Tally(detail)
        tally.lines.append(line_no)

    def note(self, line_no: int, kind: str, detail: str = "") -> None:
        """Record something worth knowing about a line that was still read."""
        self._notes.setdefault(kind, _Tally(detail)).lines.append(line_no)

    def __len__(self) -> int:
        return sum(len(t.lines) for t in self._skipped.values())

    @property
    def lines(self) -> list[int]:
        """Every skipped line number, ascending."""
        return sorted(n for t in self._skipped.values() for n in t.lines)

    def counts(self) -> dict[str, int]:
        """Skipped lines per kind of problem."""
        return {kind: len(t.lines) for kind, t in self._skipped.items()}

    def messages(self) -> list[str]:
        """One human-readable line per kind of problem (skipped lines, then notes)."""
        where = f"{self.path}: " if self.path else ""
        out = [where + _describe(kind, t, "skipped") for kind, t in self._skipped.items()]
        out += [where + _describe(kind, t, "read") for kind, t in self._notes.items()]
        return out

    def __repr__(self) -> str:
        return f"ReadProblems({self.path!r}, skipped={len(self)}, kinds={self.counts()})"


def _describe(kind: str, tally: _Tally, verb: str) -> str:
    detail = f" ({tally.detail})" if tally.detail else ""
    n = len(tally.lines)
    if n == 1:
        return f"line {tally.lines[0]}: {kind}{detail}; {verb}"
    shown = ", ".join(str(x) for x in tally.lines[:_MAX_LISTED])
    more = f", ... ({n - _MAX_LISTED} more)" if n > _MAX_LISTED else ""
    return f"{n} lines {verb}: {kind}{detail}; lines {shown}{more}"


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


# NaN/Infinity are not JSON; a writer of this schema never emits them.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def fast_loads() -> Any:
    """orjson's `loads` when installed (`gradience[fast]`), else None.

    Why: on a million-line log, stdlib parsing is most of the time; orjson parses the same
    valid lines ~2.5x faster. It is only a fast path: a line it refuses (NaN literals,
    numbers past float range, bad UTF-8, any syntax error) goes through the stdlib decoder,
    whose verdict and messages are the reader's contract. One difference remains: an integer
    literal past 64 bits arrives as the nearest float. `GRADIENCE_NO_ORJSON=1` turns it off.
    """
    if os.environ.get("GRADIENCE_NO_ORJSON"):
        return None
    try:
        import orjson
    except ImportError:
        return None
    return orjson.loads


def _classify(data: Any) -> tuple[str, str] | None:
    """Why a parsed line is not a record, or None when it is one after all."""
    if not isinstance(data, dict):
        return "not a JSON object", type(data).__name__
    missing = [f for f in ENVELOPE_FIELDS if f not in data]
    if missing:
        return f"missing envelope field `{missing[0]}`", ""
    seq, step, ts = data["seq"], data["step"], data["ts"]
    if type(seq) is not int or seq < 0:
        return "bad envelope field `seq`", "not an integer >= 0"
    if step is not None and type(step) is not int:
        return "bad envelope field `step`", "not an integer or null"
    if type(ts) not in (int, float):
        return "bad envelope field `ts`", "not a number"
    if type(data["event"]) is not str:
        return "bad envelope field `event`", "not a string"
    if type(data["run_id"]) is not str or not data["run_id"]:
        return "bad envelope field `run_id`", "not a non-empty string"
    parsed = parse_schema(data["schema"])
    if parsed is None or parsed[0] != SCHEMA_NAME:
        return "not a gradience.run record", f"schema {str(data['schema'])[:40]!r}"
    return None


def _decode_problem(raw: bytes, exc: BaseException) -> tuple[str, str]:
    """Name the kind of problem of a line that did not decode."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8", ""
    if isinstance(exc, RecursionError):
        return "malformed JSON", "nested too deep"
    if isinstance(exc, json.JSONDecodeError):
        if not raw.strip():
            return "blank line", ""
        if not raw.endswith(b"\n"):
            return "torn last line (no trailing newline)", exc.msg
        return "malformed JSON", exc.msg
    if str(exc).startswith("non-standard JSON constant"):
        return "NaN or Infinity (not JSON)", str(exc)
    return "malformed JSON", str(exc)[:80]  # e.g. an integer too long to convert


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str, str]:
    """Parse one line: (record, "", "") or (None, kind, detail)."""
    try:
        data = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        return (None, *_decode_problem(raw, exc))
    problem = _classify(data)
    return (data, "", "") if problem is None else (None, *problem)


def open_log(path: str | os.PathLike[str]) -> Path:
    log = Path(path)
    if not log.exists():
        raise UsageError(f"run log not found: {log}")
    if not log.is_file():
        raise UsageError(f"run log is not a file: {log}")
    return log


def iter_records(
    path: str | os.PathLike[str], strict: bool = False, problems: ReadProblems | None = None
) -> Iterator[Record]:
    """Yield the valid records of a run log, one line at a time, in file order.

    Why streaming: logs of long runs reach millions of lines. Tolerant mode (default) skips
    malformed JSON, non-object lines, records missing envelope fields and a torn last line,
    and reports each in `problems` if given. A record of a newer major schema version is
    read with one warning. Unknown keys and unknown event names are passed through.

    Raises:
        UsageError: `path` does not exist (raised at the call, not at the first `next`).
        TelemetryError: in `strict` mode, at the first bad line, naming file and line.

    Example:
        >>> for rec in iter_records("run.jsonl"):  # doctest: +SKIP
        ...     if rec.event == "eval": print(rec.step, rec.data["metrics"])
    """
    log = open_log(path)
    if problems is not None and not problems.path:
        problems.path = str(log)
    return _records(_scan(log, strict, problems))


def iter_record_data(
    path: str | os.PathLike[str], strict: bool = False, problems: ReadProblems | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`iter_records` without the `Record` wrapper: (line number, record dict) pairs.

    Why: one-pass summaries of million-line logs (`monitor`, `analyze`) spend a third of
    their time building `Record` objects they read three fields of. Every yielded dict has
    passed the same envelope checks, so `data["event"]`, `data["step"]`, `data["run_id"]`
    are well typed. Same arguments, errors and problem reports as `iter_records`.
    """
    log = open_log(path)
    if problems is not None and not problems.path:
        problems.path = str(log)
    return _scan(log, strict, problems)


def _records(pairs: Iterator[tuple[int, dict[str, Any]]]) -> Iterator[Record]:
    for line_no, d in pairs:
        yield Record(line_no, d["seq"], d["step"], d["event"], d["ts"], d["run_id"], d)


def _scan(
    log: Path, strict: bool, problems: ReadProblems | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(log, "rb") as fh:
        yield from scan_lines(log, enumerate(fh, 1), strict, problems, ScanState())


@dataclass
class ScanState:
    """What a scan carries from one line to the next: whether the newer-schema warning was given."""

    warned: bool = False


def scan_lines(
    log: Path,
    numbered: Iterable[tuple[int, bytes]],
    strict: bool,
    problems: ReadProblems | None,
    state: ScanState,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The reader's rule for each (line number, raw line): yield the valid records, report or
    raise on the rest. Every read of a log goes through it, line by line or (a chunk that
    did not pass `telemetry.chunks`' whole-chunk check) chunk by chunk."""
    decode, raw_decode, envelope, fast = _DECODER.decode, _DECODER.raw_decode, _ENVELOPE, fast_loads()
    for line_no, raw in numbered:
        data: Any
        try:
            data = fast(raw) if fast is not None else _NOT_PARSED
        except Exception:  # orjson's refusal is only a hint: the stdlib decides below
            data = _NOT_PARSED
        try:
            if data is _NOT_PARSED:
                text = raw.decode("utf-8")
                # Fast path: a line that is exactly one JSON value and its newline skips
                # `decode`'s whitespace regexes; anything else takes `decode` for its errors.
                try:
                    data, end = raw_decode(text)
                    if end != len(text) and text[end:] != "\n":
                        raise ValueError
                except ValueError:
                    data = decode(text)
        except (ValueError, RecursionError) as exc:
            kind, detail = _decode_problem(raw, exc)
        else:
            # Hot path, inlined because it runs once per line: a current, valid record.
            if type(data) is dict and data.keys() >= envelope and data["schema"] == SCHEMA:
                seq, step, ts, event, run_id = (
                    data["seq"], data["step"], data["ts"], data["event"], data["run_id"]
                )  # fmt: skip
                if (
                    type(seq) is int
                    and seq >= 0
                    and (step is None or type(step) is int)
                    and type(ts) in (float, int)
                    and type(event) is str
                    and type(run_id) is str
                    and run_id
                ):
                    yield line_no, data
                    continue
            problem = _classify(data)
            if problem is None:  # valid, but another schema version
                if not state.warned:
                    state.warned = _warn_newer(log, line_no, data["schema"], problems)
                yield line_no, data
                continue
            kind, detail = problem
        if strict:
            suffix = f" ({detail})" if detail else ""
            raise TelemetryError(f"{log}:{line_no}: {kind}{suffix}; fix or drop the line")
        if problems is not None:
            problems.add(line_no, kind, detail)


def _warn_newer(log: Path, line_no: int, schema: str, problems: ReadProblems | None) -> bool:
    parsed = parse_schema(schema)
    if parsed is None or parsed[1] <= SCHEMA_MAJOR:
        return False
    message = f"{log}:{line_no}: written as {schema}, newer than {SCHEMA}; reading what is known"
    warnings.warn(message, UserWarning, stacklevel=3)
    if problems is not None:
        problems.note(line_no, f"newer schema {schema}")
    return True


def read_last_record(path: str | os.PathLike[str]) -> Record | None:
    """The last valid record of a log, reading backwards from the end; None if there is none.

    Why: resuming a writer or appending after the fact needs the last `seq` and `run_id`,
    and reading a whole multi-gigabyte log for that would be wasteful.
    """
    log = open_log(path)
    with open(log, "rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        carry = b""  # the (possibly partial) first line of what has been read so far
        chunk = _TAIL_CHUNK
        while pos > 0:
            size = min(chunk, pos)
            chunk = min(chunk * 2, 1 << 24)  # doubling keeps a huge last line linear
            pos -= size
            fh.seek(pos)
            pieces = (fh.read(size) + carry).split(b"\n")
            carry = pieces[0]
            for piece in reversed(pieces[1:] if pos > 0 else pieces):
                record = _tail_record(piece)
                if record is not None:
                    return record
            if pos == 0:
                break
    return None


def _tail_record(piece: bytes) -> Record | None:
    if not piece.strip():
        return None
    data, _, _ = _parse(piece + b"\n")
    if data is None:
        return None
    return Record(0, data["seq"], data["step"], data["event"], data["ts"], data["run_id"], data)


@dataclass(frozen=True)
class RunLog:
    """A whole (small) run log in memory: all records in order, and per event type."""

    path: Path
    records: list[Record]
    by_event: dict[str, list[Record]]
    problems: ReadProblems

    def events(self, name: str) -> list[Record]:
        """Records of one event type, in file order (empty list if none)."""
        return self.by_event.get(name, [])

    def last(self, name: str) -> Record | None:
        """The last record of one event type, e.g. `run_end`, or None."""
        found = self.by_event.get(name)
        return found[-1] if found else None

    @property
    def run_ids(self) -> list[str]:
        """Run ids in order of first appearance (more than one after a fresh restart)."""
        return list(dict.fromkeys(r.run_id for r in self.records))

    def __len__(self) -> int:
        return len(self.records)


def read_run(path: str | os.PathLike[str], strict: bool = False) -> RunLog:
    """Read a whole log into a `RunLog` grouped by event; for logs that fit in memory.

    Raises:
        UsageError: `path` does not exist.
        TelemetryError: in `strict` mode, at the first bad line.

    Example:
        >>> run = read_run("run.jsonl")  # doctest: +SKIP
        >>> [r.step for r in run.events("eval")]  # doctest: +SKIP
    """
    problems = ReadProblems(path)
    records = list(iter_records(path, strict=strict, problems=problems))
    by_event: dict[str, list[Record]] = {}
    for record in records:
        by_event.setdefault(record.event, []).append(record)
    return RunLog(Path(path), records, by_event, problems)
