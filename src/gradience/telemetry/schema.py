"""The run-log schema (`gradience.run/1`): event names, envelope, per-event fields, checks.

One home for what a valid `run.jsonl` line is, so the writer, the reader and every tool
that consumes a run log agree. docs/telemetry.md is the prose version of this file.

Versioning: readers ignore keys they do not know; a new major version (`gradience.run/2`)
means an incompatible change. Field paths inside a record (used by `nonfinite`) follow
`format_path` below.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

SCHEMA_NAME = "gradience.run"
SCHEMA_MAJOR = 1
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_MAJOR}"

RUN_START = "run_start"
RUN_RESUME = "run_resume"
TRAIN_STEP = "train_step"
EVAL = "eval"
METRICS = "metrics"
ALERT = "alert"
RECOMMENDATION = "recommendation"
RUN_END = "run_end"
EVENTS: tuple[str, ...] = (
    RUN_START,
    RUN_RESUME,
    TRAIN_STEP,
    EVAL,
    METRICS,
    ALERT,
    RECOMMENDATION,
    RUN_END,
)

# Every record carries these, in this order.
ENVELOPE_FIELDS: tuple[str, ...] = ("schema", "ts", "run_id", "seq", "event", "step")

STRUCTURAL_KIND = "structural"
# Why a structural snapshot was taken; analysis joins on it instead of forward-filling.
STRUCTURAL_REASONS: tuple[str, ...] = ("interval", "eval", "trigger", "final")
RUN_END_STATUSES: tuple[str, ...] = ("ok", "error", "aborted")

_SCHEMA_RE = re.compile(r"^([a-z][a-z0-9_.]*)/([0-9]+)$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH_TOKEN_RE = re.compile(r'\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def parse_schema(value: object) -> tuple[str, int] | None:
    """Split `"gradience.run/1"` into `("gradience.run", 1)`; None when it is not that shape.

    Readers use it to tell a newer major version (read with a warning) from a foreign file.
    """
    if not isinstance(value, str):
        return None
    match = _SCHEMA_RE.match(value)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def format_path(parts: Sequence[str | int]) -> str:
    """Render a location inside a record, e.g. `modules["layer.0.q"].sigma_max`.

    Why not plain dots: module names contain dots, so `a.b.c` would be ambiguous. The rule:
    a dict key that is an identifier (`[A-Za-z_][A-Za-z0-9_]*`) is written `.key` (no dot at
    the start); any other key is written `["key"]` with JSON string escaping; a list index is
    written `[3]`. `parse_path` inverts it exactly.

    Example:
        >>> format_path(["modules", "layer.0.q", "sigma_max"])
        'modules["layer.0.q"].sigma_max'
    """
    out: list[str] = []
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENT_RE.match(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{json.dumps(part)}]")
    return "".join(out)


def parse_path(path: str) -> list[str | int]:
    """Invert `format_path`: `'history[2]["a.b"]'` -> `["history", 2, "a.b"]`.

    Raises:
        ValueError: `path` is not in the notation `format_path` writes.
    """
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        match = _PATH_TOKEN_RE.match(path, pos)
        if match is None or (pos == 0 and path.startswith(".")):
            raise ValueError(f"not a record path at offset {pos}: {path!r}")
        ident, index, quoted = match.groups()
        if ident is not None:
            if pos > 0 and not match.group(0).startswith("."):
                raise ValueError(f"missing `.` before `{ident}` in {path!r}")
            parts.append(ident)
        elif index is not None:
            parts.append(int(index))
        else:
            parts.append(json.loads(quoted))
        pos = match.end()
    return parts


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_envelope(record: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    missing = [name for name in ENVELOPE_FIELDS if name not in record]
    if missing:
        problems.append("missing envelope field(s): " + ", ".join(f"`{m}`" for m in missing))
    ts: Any = record.get("ts")
    seq, step = record.get("seq"), record.get("step")
    if "ts" in record and not (_is_number(ts) and math.isfinite(ts)):
        problems.append(f"`ts` must be a finite number of unix seconds, got {ts!r}")
    if "run_id" in record and not (isinstance(record["run_id"], str) and record["run_id"]):
        problems.append(f"`run_id` must be a non-empty string, got {record['run_id']!r}")
    if "seq" in record and not (type(seq) is int and seq >= 0):
        problems.append(f"`seq` must be an integer >= 0, got {seq!r}")
    if "event" in record and not isinstance(record["event"], str):
        problems.append(f"`event` must be a string, got {record['event']!r}")
    if step is not None and type(step) is not int:
        problems.append(f"`step` must be an integer or null, got {step!r}")
    return problems


def _require(record: dict[str, Any], field: str, kind: type, what: str) -> list[str]:
    if field not in record:
        return [f"`{record.get('event')}` record needs `{field}` ({what})"]
    if not isinstance(record[field], kind):
        return [f"`{field}` must be {what}, got {type(record[field]).__name__}"]
    return []


def _check_event(record: dict[str, Any]) -> list[str]:
    event = record.get("event")
    problems: list[str] = []
    if event == TRAIN_STEP and type(record.get("step")) is not int:
        problems.append("`train_step` record needs an integer `step`")
    elif event == EVAL:
        problems += _require(record, "split", str, "a string")
        problems += _require(record, "metrics", dict, "an object")
    elif event == METRICS:
        problems += _require(record, "kind", str, "a string")
        problems += _require(record, "metrics", dict, "an object")
        if record.get("kind") == STRUCTURAL_KIND:
            if record.get("reason") not in STRUCTURAL_REASONS:
                problems.append(
                    f"structural `reason` must be one of {', '.join(STRUCTURAL_REASONS)}; "
                    f"got {record.get('reason')!r}"
                )
            if "modules" in record and not isinstance(record["modules"], dict):
                problems.append("`modules` must be an object of module path -> metrics")
            cost = record.get("cost_ms")
            if cost is not None and not _is_number(cost):
                problems.append(f"`cost_ms` must be a number, got {cost!r}")
    elif event == ALERT:
        for field in ("severity", "code", "message"):
            problems += _require(record, field, str, "a string")
    elif event == RECOMMENDATION:
        for field in ("code", "message"):
            problems += _require(record, field, str, "a string")
    elif event == RUN_END and record.get("status") not in RUN_END_STATUSES:
        problems.append(
            f"`run_end` `status` must be one of {', '.join(RUN_END_STATUSES)}; "
            f"got {record.get('status')!r}"
        )
    elif isinstance(event, str) and event not in EVENTS:
        problems.append(f"unknown event `{event}` (known: {', '.join(EVENTS)})")
    return problems


def validate_record(record: dict[str, Any]) -> list[str]:
    """Check one parsed record against `gradience.run/1`; an empty list means valid.

    Why a list and not an exception: `gradience validate`-style tools show every problem of
    a line at once, and the writer turns a non-empty list into one error. Unknown extra keys
    are allowed. A record of a newer major version gets one problem and no further checks.

    Example:
        >>> validate_record({"event": "run_end"})[0]
        'missing envelope field(s): `schema`, `ts`, `run_id`, `seq`, `step`'
    """
    if not isinstance(record, dict):
        return [f"a record must be a JSON object, got {type(record).__name__}"]
    problems = _check_envelope(record)
    if "schema" in record:
        parsed = parse_schema(record["schema"])
        if parsed is None or parsed[0] != SCHEMA_NAME:
            problems.append(f"`schema` must look like `{SCHEMA}`, got {record['schema']!r}")
        elif parsed[1] > SCHEMA_MAJOR:
            problems.append(
                f"`schema` {record['schema']!r} is newer than {SCHEMA}; fields not checked"
            )
            return problems
    nonfinite = record.get("nonfinite")
    if nonfinite is not None and not (
        isinstance(nonfinite, list) and all(isinstance(p, str) for p in nonfinite)
    ):
        problems.append("`nonfinite` must be a list of field paths")
    return problems + _check_event(record)
