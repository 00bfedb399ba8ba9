"""Run telemetry: the `gradience.run/1` schema, an append-only writer and a tolerant reader.

See docs/telemetry.md for the format. Typical use:

    from gradience.telemetry import RunWriter, iter_records

    with RunWriter("runs/toy/run.jsonl") as log:
        log.write("run_start", step=0, config={"r": 8})
        log.write("train_step", step=1, loss=0.71)
    for record in iter_records("runs/toy/run.jsonl"):
        print(record.seq, record.event)
"""

from __future__ import annotations

from gradience.telemetry.reader import (
    ReadProblems,
    Record,
    RunLog,
    iter_record_data,
    iter_records,
    read_last_record,
    read_run,
)
from gradience.telemetry.schema import (
    ENVELOPE_FIELDS,
    EVENTS,
    RUN_END_STATUSES,
    SCHEMA,
    SCHEMA_MAJOR,
    SCHEMA_NAME,
    STRUCTURAL_REASONS,
    format_path,
    parse_path,
    parse_schema,
    validate_record,
)
from gradience.telemetry.writer import (
    MAX_TEXT_CHARS,
    RunWriter,
    append_record_atomic,
    is_secret_key,
    sanitize,
)

__all__ = [
    "ENVELOPE_FIELDS",
    "EVENTS",
    "MAX_TEXT_CHARS",
    "RUN_END_STATUSES",
    "SCHEMA",
    "SCHEMA_MAJOR",
    "SCHEMA_NAME",
    "STRUCTURAL_REASONS",
    "ReadProblems",
    "Record",
    "RunLog",
    "RunWriter",
    "append_record_atomic",
    "format_path",
    "is_secret_key",
    "iter_record_data",
    "iter_records",
    "parse_path",
    "parse_schema",
    "read_last_record",
    "read_run",
    "sanitize",
    "validate_record",
]
