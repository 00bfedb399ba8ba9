"""Tests for gradience.telemetry.reader and schema: tolerant streaming, strict mode, checks."""

from __future__ import annotations

import json
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradience.errors import TelemetryError, UsageError
from gradience.telemetry import (
    ENVELOPE_FIELDS,
    EVENTS,
    SCHEMA,
    ReadProblems,
    Record,
    RunWriter,
    iter_records,
    read_last_record,
    read_run,
    validate_record,
)


def rec(seq: int, event: str = "train_step", step: int | None = 0, **extra: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "ts": 1.5, "run_id": "r", "seq": seq, "event": event,
            "step": step, **extra}  # fmt: skip


def line(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def write(path: Path, *chunks: bytes) -> Path:
    path.write_bytes(b"".join(chunks))
    return path


def test_reads_records_in_order_with_envelope(tmp_path: Path) -> None:
    log = write(tmp_path / "run.jsonl", line(rec(0, "run_start", None)), line(rec(1, loss=0.5)))
    got = list(iter_records(log))
    assert got[0] == Record(1, 0, None, "run_start", 1.5, "r", rec(0, "run_start", None))
    assert (got[1].line_no, got[1].seq, got[1].data["loss"]) == (2, 1, 0.5)


def test_is_lazy_and_streams(tmp_path: Path) -> None:
    log = tmp_path / "big.jsonl"
    with open(log, "wb") as fh:
        for i in range(20000):
            fh.write(line(rec(i, step=i, loss=0.25, note="x" * 200)))
    assert log.stat().st_size > 4_000_000
    records = iter_records(log)
    assert isinstance(records, Iterator)
    tracemalloc.start()
    count = sum(1 for _ in records)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 20000 and peak < 1_000_000


def test_missing_file_is_usage_error_at_call(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="run log not found") as info:
        iter_records(tmp_path / "nope.jsonl")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError):
        read_run(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="not a file"):
        iter_records(tmp_path)


def test_tolerant_mode_skips_and_reports_each_bad_line(tmp_path: Path) -> None:
    bad_seq = rec(5)
    bad_seq["seq"] = "five"
    no_run_id = rec(6)
    del no_run_id["run_id"]
    log = write(
        tmp_path / "run.jsonl",
        line(rec(0)),  # 1
        b"{not json\n",  # 2
        b"[1, 2]\n",  # 3
        line(no_run_id),  # 4
        line(bad_seq),  # 5
        b'{"schema":"other/1","ts":1,"run_id":"r","seq":1,"event":"x","step":null}\n',  # 6
        b'{"schema":"gradience.run/1","ts":NaN,"run_id":"r","seq":1,"event":"x","step":1}\n',
        b"\xff\xfe garbage\n",  # 8
        b"\n",  # 9
        line(rec(1)),  # 10
        b'{"schema":"gradience.run/1","ts":1.0,"ru',  # 11: torn
    )
    problems = ReadProblems()
    got = list(iter_records(log, problems=problems))
    assert [r.line_no for r in got] == [1, 10]
    assert problems.lines == [2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert len(problems) == 9
    counts = problems.counts()
    assert counts["missing envelope field `run_id`"] == 1
    assert counts["torn last line (no trailing newline)"] == 1
    assert counts["not UTF-8"] == 1 and counts["blank line"] == 1
    text = "\n".join(problems.messages())
    assert "line 11: torn last line" in text and str(log) in text


def test_valid_last_line_without_newline_is_read(tmp_path: Path) -> None:
    log = write(tmp_path / "run.jsonl", line(rec(0)), line(rec(1))[:-1])
    assert [r.seq for r in iter_records(log)] == [0, 1]


def test_strict_mode_names_file_and_line(tmp_path: Path) -> None:
    log = write(tmp_path / "run.jsonl", line(rec(0)), line(rec(1)), b"{oops\n")
    with pytest.raises(TelemetryError, match=r"run\.jsonl:3: malformed JSON"):
        list(iter_records(log, strict=True))
    torn = write(tmp_path / "torn.jsonl", line(rec(0)), b'{"sch')
    with pytest.raises(TelemetryError, match=r"torn\.jsonl:2: torn last line"):
        list(iter_records(torn, strict=True))


def test_repeated_problems_are_summarised(tmp_path: Path) -> None:
    log = write(tmp_path / "run.jsonl", b"garbage\n" * 1000, line(rec(0)))
    problems = ReadProblems()
    assert len(list(iter_records(log, problems=problems))) == 1
    messages = problems.messages()
    assert len(messages) == 1
    assert "1000 lines skipped: malformed JSON" in messages[0]
    assert "995 more" in messages[0]
    assert problems.lines == list(range(1, 1001))


def test_newer_major_schema_warns_once_and_reads(tmp_path: Path) -> None:
    newer = [dict(rec(i), schema="gradience.run/2", shiny={"new": True}) for i in range(3)]
    log = write(tmp_path / "run.jsonl", line(rec(0)), *(line(r) for r in newer))
    problems = ReadProblems()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(iter_records(log, problems=problems))
    assert len(got) == 4 and got[1].data["shiny"] == {"new": True}
    assert len([w for w in caught if "newer than" in str(w.message)]) == 1
    assert len(problems) == 0 and "newer schema" in problems.messages()[0]


def test_unknown_keys_and_events_pass_through(tmp_path: Path) -> None:
    log = write(tmp_path / "run.jsonl", line(rec(0, "future_event", 3, extra=[1, 2])))
    (only,) = iter_records(log)
    assert only.event == "future_event" and only.data["extra"] == [1, 2]


def test_read_run_groups_by_event(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    with RunWriter(log, run_id="abc") as w:
        w.write("run_start", config={"r": 4})
        for step in (1, 2):
            w.write("train_step", step=step, loss=0.5)
        w.write("eval", step=2, split="test", metrics={"loss": 0.4})
        w.write("run_end", step=2, status="ok")
    with open(log, "ab") as fh:
        fh.write(b"junk\n")
    run = read_run(log)
    assert len(run) == 5 and run.run_ids == ["abc"]
    assert [r.step for r in run.events("train_step")] == [1, 2]
    assert run.events("alert") == []
    last = run.last("run_end")
    assert last is not None and last.data["status"] == "ok"
    assert run.problems.lines == [6]
    with pytest.raises(TelemetryError):
        read_run(log, strict=True)


def test_read_last_record(tmp_path: Path) -> None:
    assert read_last_record(write(tmp_path / "empty.jsonl")) is None
    assert read_last_record(write(tmp_path / "junk.jsonl", b"x\n" * 50000)) is None
    log = write(tmp_path / "run.jsonl", line(rec(0)), line(rec(7)), b"junk\n", b'{"torn')
    last = read_last_record(log)
    assert last is not None and last.seq == 7 and last.line_no == 0
    only = write(tmp_path / "one.jsonl", line(rec(3))[:-1])
    found = read_last_record(only)
    assert found is not None and found.seq == 3


# --- validate_record -------------------------------------------------------------------

# fmt: off
VALID = [
    rec(0, "run_start", None, config={"r": 8}),
    rec(1, "run_resume", 10),
    rec(2, "train_step", 11, loss=0.3),
    rec(3, "eval", 20, split="test", metrics={"loss": 0.48, "accuracy": 0.77}),
    rec(4, "metrics", 20, kind="structural", reason="eval", metrics={"stable_rank": 2.0},
        modules={"layer.0.q_proj": {"stable_rank": 2.0}}, cost_ms=3.1),
    rec(5, "metrics", 20, kind="lora_audit", metrics={}),
    rec(6, "alert", 20, severity="warning", code="GRAD_SPIKE", message="grad norm x10"),
    rec(7, "recommendation", None, code="RANK", message="r=8 is enough"),
    rec(8, "run_end", 20, status="aborted"),
]
# fmt: on


@pytest.mark.parametrize("record", VALID, ids=lambda r: r["event"])
def test_valid_records_pass(record: dict[str, Any]) -> None:
    assert validate_record(record) == []


@pytest.mark.parametrize(
    ("record", "expect"),
    [
        ({"event": "run_end", "status": "ok"}, "missing envelope field"),
        (dict(rec(0), seq=-1), "`seq`"),
        (dict(rec(0), ts=float("nan")), "`ts`"),
        (dict(rec(0), step=1.5), "`step`"),
        (dict(rec(0), schema="gradience.run"), "`schema`"),
        (rec(0, "train_step", None), "integer `step`"),
        (rec(0, "eval", 1, metrics={}), "`split`"),
        (rec(0, "eval", 1, split="test", metrics=[1]), "`metrics` must be"),
        (rec(0, "metrics", 1, kind="structural", metrics={}), "reason"),
        (rec(0, "metrics", 1, kind="structural", reason="eval", metrics={}, modules=[]), "modules"),
        (rec(0, "alert", 1, code="X", message="m"), "`severity`"),
        (rec(0, "recommendation", 1, code="X"), "`message`"),
        (rec(0, "run_end", 1, status="fine"), "status"),
        (rec(0, "bogus", 1), "unknown event"),
        (dict(rec(0), nonfinite="loss"), "nonfinite"),
    ],
)
def test_invalid_records_are_named(record: dict[str, Any], expect: str) -> None:
    problems = validate_record(record)
    assert problems and any(expect in p for p in problems), problems


def test_newer_schema_is_not_checked_further() -> None:
    problems = validate_record(rec(0, "new_event", None, schema="gradience.run/3"))
    assert len(problems) == 1 and "newer" in problems[0]


# --- property: garbage interleaved with valid records ----------------------------------

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
valid_records = st.builds(
    lambda seq, step, ts, event, run_id, extra: {
        **extra,
        "schema": SCHEMA,
        "ts": ts,
        "run_id": run_id,
        "seq": seq,
        "event": event,
        "step": step,
    },
    st.integers(0, 2**40),
    st.none() | st.integers(-5, 10**9),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(EVENTS) | st.text(max_size=10),
    st.text(min_size=1, max_size=10),
    st.dictionaries(st.text(max_size=8), json_scalar, max_size=4),
)


def is_valid_line(raw: bytes) -> bool:
    """Independent oracle: a UTF-8 JSON object with every envelope field well typed."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError, RecursionError):
        return False
    if not isinstance(data, dict) or not all(f in data for f in ENVELOPE_FIELDS):
        return False
    return (
        type(data["seq"]) is int and data["seq"] >= 0
        and (data["step"] is None or type(data["step"]) is int)
        and type(data["ts"]) in (int, float)
        and type(data["event"]) is str
        and type(data["run_id"]) is str and data["run_id"] != ""
        and str(data["schema"]).startswith("gradience.run/")
    )  # fmt: skip


@st.composite
def bad_lines(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid line damaged in a way that must make it invalid."""
    how = draw(st.sampled_from(["bytes", "truncate", "drop", "retype", "wrap", "schema"]))
    if how == "bytes":
        raw = draw(st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\n", b"")))
        return raw if raw and not is_valid_line(raw) else b"\x00"
    record = draw(valid_records)
    text = json.dumps(record, separators=(",", ":"))
    if how == "truncate":
        return text[: draw(st.integers(1, len(text) - 1))].encode()
    if how == "drop":
        del record[draw(st.sampled_from(ENVELOPE_FIELDS))]
    elif how == "retype":
        record[draw(st.sampled_from(["seq", "ts", "run_id", "event"]))] = [None]
    elif how == "wrap":
        return json.dumps([record]).encode()
    else:
        record["schema"] = draw(st.sampled_from(["other/1", "gradience.run", 7]))
    return json.dumps(record).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.booleans(), valid_records, bad_lines()), max_size=25),
    st.booleans(),
)
def test_tolerant_reader_yields_exactly_the_valid_records(
    tmp_path_factory: pytest.TempPathFactory,
    items: list[tuple[bool, dict[str, Any], bytes]],
    final_newline: bool,
) -> None:
    raws = [json.dumps(r).encode() if good else bad for good, r, bad in items]
    expected_good = [i + 1 for i, (good, _, _) in enumerate(items) if good]
    expected_bad = [i + 1 for i, (good, _, _) in enumerate(items) if not good]
    body = b"\n".join(raws) + (b"\n" if final_newline and raws else b"")
    log = tmp_path_factory.mktemp("prop") / "run.jsonl"
    log.write_bytes(body)
    problems = ReadProblems()
    got = list(iter_records(log, problems=problems))
    assert [r.line_no for r in got] == expected_good
    assert [r.data for r in got] == [items[n - 1][1] for n in expected_good]
    assert problems.lines == expected_bad
    assert len(problems.messages()) == len(problems.counts())  # one message per kind
    if expected_bad:
        with pytest.raises(TelemetryError, match=f":{expected_bad[0]}: "):
            list(iter_records(log, strict=True))
    else:
        assert len(list(iter_records(log, strict=True))) == len(expected_good)


# --- docs/telemetry.md examples --------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "telemetry.md"


def doc_blocks(lang: str) -> list[str]:
    parts = DOC.read_text("utf-8").split("```")
    return [p[len(lang) + 1 :] for p in parts[1::2] if p.startswith(lang + "\n")]


def test_doc_example_lines_are_valid_records() -> None:
    lines = [ln for block in doc_blocks("jsonl") for ln in block.splitlines() if ln]
    events = {json.loads(ln)["event"] for ln in lines}
    assert events == set(EVENTS)
    for ln in lines:
        assert validate_record(json.loads(ln)) == [], ln


def test_doc_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (code,) = doc_blocks("python")
    exec(compile(code, str(DOC), "exec"), {})
    assert [r.event for r in iter_records("runs/toy/run.jsonl")][-1] == "metrics"


def test_orjson_fast_path_and_stdlib_path_read_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # orjson (when installed) only speeds up valid lines: every verdict is the stdlib decoder's.
    pytest.importorskip("orjson")
    path = write(
        tmp_path / "run.jsonl",
        line(rec(0)),
        b' {"x": 1} \r\n',  # not a record
        json.dumps(rec(1)).encode() + b"\r\n",  # CRLF, still valid
        b'{"schema": "gradience.run/1", "loss": NaN}\n',  # NaN literal: refused
        json.dumps(rec(2, loss=10**30)).encode() + b"\n",  # integer past 64 bits: orjson gives a float
        json.dumps(rec(3, loss=1.0)).encode()[:-1] + b"1e999}\n",  # trailing garbage
        b'{"a": "\xff"}\n',  # not UTF-8
        json.dumps(rec(4, note="\ud800")).encode() + b"\n",  # lone surrogate escape
        line(rec(5)),
        b'{"schema": "gradience.run/1", "seq": 6',  # torn last line
    )

    def read() -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
        from gradience.telemetry import iter_record_data

        problems = ReadProblems()
        return list(iter_record_data(path, problems=problems)), problems.messages()

    fast = read()
    monkeypatch.setenv("GRADIENCE_NO_ORJSON", "1")
    slow = read()
    assert slow[1] == fast[1]
    assert [n for n, _ in fast[0]] == [n for n, _ in slow[0]] == [1, 3, 5, 6, 8, 9]
    # the one documented difference: an integer past 64 bits arrives as the nearest float
    assert fast[0][2][1].pop("loss") == pytest.approx(slow[0][2][1].pop("loss"), rel=1e-15)
    assert fast[0] == slow[0]
