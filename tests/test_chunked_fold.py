"""The chunked read and the batched train-step fold equal the record-at-a-time rule.

`monitor` reads a log in chunks checked as a whole and folds runs of train steps in
batches; the line reader (`iter_record_data`) and `Summary.add` are the rule. Hypothesis
writes logs that stress every fallback: layouts that change mid-batch, null / string /
integer / boolean / huge losses, NaN-marked steps, several run ids, null steps, evals and
snapshots between steps, and damaged lines of every kind the reader names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradience.runlog import monitor as monitor_module
from gradience.runlog.summary import Summary
from gradience.telemetry import ReadProblems, iter_record_data
from gradience.telemetry import chunks as chunks_module
from gradience.telemetry.chunks import CHUNK_BYTES, iter_record_chunks

SCHEMA = "gradience.run/1"

values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.floats(min_value=0.0, max_value=5.0),
    st.integers(-(10**20), 10**20),
    st.none(),
    st.booleans(),
    st.sampled_from(["warmup", ""]),
)
metric_keys = st.sampled_from(["loss", "lr", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"])
damage = st.sampled_from([
    "", "{not json", "[1, 2]", '{"schema": "gradience.run/1"}', "NaN", "\ufeff{}", '"text"',
    '{"schema":"gradience.run/1","ts":1.0,"run_id":"r","seq":-1,"event":"x","step":1}',
    '{"schema":"gradience.run/1","ts":1.0,"run_id":"","seq":1,"event":"x","step":1}',
    '{"schema":"gradience.run/1","ts":"t","run_id":"r","seq":1,"event":"x","step":1}',
    '{"schema":"gradience.run/1","ts":1.0,"run_id":"r","seq":1,"event":"x","step":true}',
    '{"schema":"gradience.run/9","ts":1.0,"run_id":"r","seq":1,"event":"eval","step":3,"split":"test","metrics":{"loss":1}}',
    '{"schema":["x"],"ts":1.0,"run_id":"r","seq":1,"event":"x","step":1}',
])  # fmt: skip


@st.composite
def logs(draw: Any) -> list[str]:
    """Lines of a log: mostly train steps, with everything a real or damaged log may hold."""
    lines: list[str] = []
    # Half the logs are clean, so that whole chunks pass the fast path and meet the batched fold.
    kinds = ["train"] * 12 + ["eval", "metrics", "start", "end", "nan"] + (["damage"] if draw(st.booleans()) else [])
    for seq in range(1, draw(st.integers(1, 400)) + 1):
        kind = draw(st.sampled_from(kinds))
        step = draw(st.one_of(st.none(), st.integers(0, 500))) if draw(st.integers(0, 9)) == 0 else seq
        run_id = draw(st.sampled_from(["r1", "r1", "r1", "r2"]))
        env = {"schema": SCHEMA, "ts": 1.0 + seq, "run_id": run_id, "seq": seq}
        if kind == "train":
            keys = draw(st.lists(metric_keys, unique=True, max_size=4))
            body = {k: draw(values) for k in ["loss", *keys]} if draw(st.booleans()) else {"loss": seq / 7}
            lines.append(json.dumps({**env, "event": "train_step", "step": step, **body}))
        elif kind == "nan":
            lines.append(json.dumps({**env, "event": "train_step", "step": step, "loss": None, "nonfinite": ["loss"]}))
        elif kind == "eval":
            split = draw(st.sampled_from(["test", "train"]))
            lines.append(json.dumps({**env, "event": "eval", "step": step, "split": split,
                                     "metrics": {"loss": draw(values), "accuracy": 0.5}}))  # fmt: skip
        elif kind == "metrics":
            agg = {"frobenius_norm": draw(values), "stable_rank": 2.0, "energy_rank_90": 3}
            lines.append(json.dumps({**env, "event": "metrics", "step": step, "kind": "structural",
                                     "metrics": agg, "modules": {}, "cost_ms": 1.5}))  # fmt: skip
        elif kind == "start":
            lines.append(json.dumps({**env, "event": "run_start", "step": 0, "config": {"r": 8}}))
        elif kind == "end":
            lines.append(json.dumps({**env, "event": "run_end", "step": step, "status": "ok"}))
        else:
            lines.append(draw(damage))
    return lines


def _write(tmp: Path, lines: list[str], torn: bool) -> Path:
    path = tmp / "run.jsonl"
    text = "\n".join(lines) + ("" if torn else "\n")
    path.write_text(text, encoding="utf-8")
    return path


def _reference(path: Path) -> Any:
    """monitor's report through the line reader and `Summary.add`, one record at a time."""
    problems = ReadProblems(path)
    s = Summary()
    for _, data in iter_record_data(path, problems=problems):
        s.add(data)
    s.finish()
    return monitor_module._report(s, str(path), problems)


@pytest.mark.filterwarnings("ignore:.*newer than gradience.run/1")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=logs(), torn=st.booleans())
def test_chunked_monitor_equals_the_record_at_a_time_rule(tmp_path: Path, lines: list[str], torn: bool) -> None:
    path = _write(tmp_path, lines, torn)
    problems = ReadProblems(path)
    if not any(True for _ in iter_record_data(path, problems=problems)):
        return  # no valid record: both raise the same TelemetryError (tested in test_monitor)
    assert monitor_module.monitor(path).to_dict() == _reference(path).to_dict()


@pytest.mark.filterwarnings("ignore:.*newer than gradience.run/1")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=logs(), torn=st.booleans())
def test_chunks_hold_the_line_readers_records_and_problems(tmp_path: Path, lines: list[str], torn: bool) -> None:
    path = _write(tmp_path, lines, torn)
    by_line, by_chunk = ReadProblems(path), ReadProblems(path)
    expected = [d for _, d in iter_record_data(path, problems=by_line)]
    chunks = list(iter_record_chunks(path, problems=by_chunk))
    assert [d for c in chunks for d in c.records] == expected
    assert by_chunk.messages() == by_line.messages() and by_chunk.lines == by_line.lines
    for c in chunks:
        assert c.events == tuple(d["event"] for d in c.records)
        assert c.steps == tuple(d["step"] for d in c.records)
        assert c.one_run_id == (len({d["run_id"] for d in c.records}) == 1)
        assert c.null_steps == (None in c.steps)


def test_a_log_longer_than_one_chunk_takes_the_whole_chunk_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clean chunks are read whole (not through the line reader), and still equal it."""
    lines = [json.dumps({"schema": SCHEMA, "ts": 1.0, "run_id": "r", "seq": i, "event": "train_step",
                         "step": i, "loss": 1.0 / (i + 1), "lr": 1e-4}) for i in range(3000)]  # fmt: skip
    path = _write(tmp_path, lines, torn=False)
    assert path.stat().st_size > 3 * CHUNK_BYTES
    calls: list[int] = []
    original = chunks_module.scan_lines

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(chunks_module, "scan_lines", spy)
    report = monitor_module.monitor(path)
    assert calls == []  # no chunk fell back to the line reader
    monkeypatch.undo()
    assert report.to_dict() == _reference(path).to_dict()
    assert report.train.n_steps == 3000 and report.train.min_loss == 1.0 / 3000
