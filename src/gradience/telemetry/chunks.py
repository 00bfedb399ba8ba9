"""Read a run log a chunk of lines at a time, checking each chunk as a whole.

The line-at-a-time reader spends about as long on its per-line Python (the envelope checks,
the generator) as orjson spends parsing. A chunk of a healthy log is checked instead with
C-level operations over all its records at once: every line parses, every record is a dict
of the current schema, every envelope field has its type. A chunk that fails any check is
read again line by line by `scan_lines`, the reader's one rule, which names each bad line
and its number; so the valid records, their order and the problems reported are the same
either way (`tests/test_telemetry_reader.py` compares the two on damaged logs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from gradience.telemetry.reader import ReadProblems, ScanState, fast_loads, open_log, scan_lines
from gradience.telemetry.schema import SCHEMA

CHUNK_BYTES = 1 << 14  # ~85 lines of a typical log: amortises the checks, stays flat in memory
_FIELDS = ("schema", "seq", "step", "ts", "event", "run_id")
_COLUMNS = itemgetter("event", "step", "run_id")
_NONE = type(None)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive valid records, with the envelope fields a summary folds by, as columns."""

    records: list[dict[str, Any]]
    events: tuple[str, ...]
    steps: tuple[int | None, ...]
    run_ids: tuple[str, ...]
    one_run_id: bool  # every record has the first one's run_id
    null_steps: bool  # some `step` is null

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Chunk:
        events, steps, run_ids = zip(*map(_COLUMNS, records), strict=True)
        return cls(records, events, steps, run_ids, run_ids.count(run_ids[0]) == len(run_ids), None in steps)


def iter_record_chunks(
    path: str | os.PathLike[str], strict: bool = False, problems: ReadProblems | None = None
) -> Iterator[Chunk]:
    """The valid records of a run log in file order, as chunks of consecutive records.

    Same arguments, errors and problem reports as `iter_record_data`; no line numbers.
    Why: a one-pass summary of a million-line log (`monitor`) folds a list of records with
    C-level operations, and reads them here at about the speed of parsing.
    """
    log = open_log(path)
    if problems is not None and not problems.path:
        problems.path = str(log)
    return _chunks(log, strict, problems)


def _chunks(log: Any, strict: bool, problems: ReadProblems | None) -> Iterator[Chunk]:
    loads, state, line_no = fast_loads(), ScanState(), 0
    getter: list[itemgetter[Any]] = []  # built from the first parsed record, then reused
    with open(log, "rb") as fh:
        while lines := fh.readlines(CHUNK_BYTES):
            first, line_no = line_no + 1, line_no + len(lines)
            chunk = _whole_chunk(lines, loads, getter) if loads is not None else None
            if chunk is None:
                records = [d for _, d in scan_lines(log, enumerate(lines, first), strict, problems, state)]
                chunk = Chunk.of(records) if records else None
            if chunk is not None:
                yield chunk


def own_key_getter(record: dict[str, Any], *names: str) -> itemgetter[Any]:
    """A getter for `names` keyed by `record`'s own key objects where it has them.

    orjson hands out one object per key name, line after line, so lookups in the other records
    then match by identity and skip a string compare (about half the cost of a lookup). A name
    the record lacks, or a later key object that differs, is still found by value.
    """
    own = dict(zip(record, record, strict=True))
    return itemgetter(*[own.get(n, n) for n in names])


def _whole_chunk(lines: list[bytes], loads: Any, getter: list[itemgetter[Any]]) -> Chunk | None:
    """Every line of the chunk parsed, when each is a valid current record; else None.

    The checks are the reader's hot path (`scan_lines`) applied to all records at once:
    a dict holding the envelope, schema exactly `SCHEMA`, `seq` an int >= 0, `step` an int
    or null, `ts` an int or float, `event` a string, `run_id` a non-empty string (bools are
    not ints here either: `type(x) is int` in both).
    """
    try:
        # One parse of the chunk as a JSON array. Equal to parsing line by line when it succeeds
        # with one element per line: every line but the last ends in a newline, which no JSON
        # string may hold raw, and a value left open by a line meets the comma added after it
        # (`[,` `{,` `:,` `,,` are all invalid), so each element is exactly one line's value.
        records = loads(b"[" + b",".join(lines) + b"]")
    except Exception:  # a line orjson refuses: the line reader decides what it is
        return None
    n = len(lines)
    if len(records) != n or set(map(type, records)) != {dict}:
        return None
    try:
        if not getter:  # a later key object that differs is still found, by a string compare
            getter.append(own_key_getter(records[0], *_FIELDS))
        schema, seq, step, ts, event, run_id = zip(*map(getter[0], records), strict=True)
        first_run, step_types = run_id[0], set(map(type, step))
        one_run_id = type(first_run) is str and run_id.count(first_run) == n
        ok = (
            schema.count(SCHEMA) == n  # no hashing: each value is a fresh string
            and set(map(type, seq)) == {int}
            and min(seq) >= 0
            and step_types <= {int, _NONE}
            and set(map(type, ts)) <= {int, float}
            and set(map(type, event)) == {str}
            and ((one_run_id and first_run != "") or (set(map(type, run_id)) == {str} and "" not in run_id))
        )
    except KeyError:  # a missing envelope field
        return None
    return Chunk(records, event, step, run_id, one_run_id, _NONE in step_types) if ok else None
