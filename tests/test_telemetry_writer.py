"""Tests for gradience.telemetry.writer: envelope, seq, resume, sanitising, atomic append."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradience.errors import TelemetryError, UsageError
from gradience.telemetry import (
    SCHEMA,
    RunWriter,
    append_record_atomic,
    format_path,
    is_secret_key,
    iter_records,
    parse_path,
    read_last_record,
    sanitize,
)
from gradience.telemetry import writer as writer_mod


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def resolve(obj: Any, path: str) -> Any:
    for part in parse_path(path):
        obj = obj[part]
    return obj


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "toy" / "run.jsonl"


# --- envelope and seq ------------------------------------------------------------------


def test_envelope_and_seq_strictly_increasing(log: Path) -> None:
    with RunWriter(log, run_id="r1", clock=lambda: 123.5) as w:
        w.write("run_start", config={"r": 8})
        for step in range(1, 4):
            w.write("train_step", step=step, loss=1.0 / step)
        returned = w.write("run_end", step=3, status="ok")
    records = lines_of(log)
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["schema"] == SCHEMA and r["run_id"] == "r1" for r in records)
    assert all(r["ts"] == 123.5 for r in records)
    assert records[0]["step"] is None and records[0]["config"] == {"r": 8}
    assert records[-1] == returned
    assert list(records[1])[:6] == ["schema", "ts", "run_id", "seq", "event", "step"]


def test_lines_are_compact_and_finite(log: Path) -> None:
    with RunWriter(log) as w:
        w.write("eval", step=2, split="test", metrics={"loss": float("inf"), "acc": 0.5})
    raw = log.read_text("utf-8")
    assert raw.endswith("\n") and raw.count("\n") == 1
    assert ", " not in raw and ": " not in raw
    assert "Infinity" not in raw and "NaN" not in raw


def test_flushed_per_record_while_open(log: Path) -> None:
    with RunWriter(log) as w:
        w.write("run_start")
        assert len(lines_of(log)) == 1
        w.write("train_step", step=1, loss=0.5)
        seen = list(iter_records(log))
        assert [r.event for r in seen] == ["run_start", "train_step"]


def test_default_run_id_and_numpy_step(log: Path) -> None:
    with RunWriter(log) as w:
        rec = w.write("train_step", step=np.int64(7), loss=np.float32(0.25))
    assert isinstance(w.run_id, str) and len(w.run_id) >= 8
    assert rec["step"] == 7 and type(rec["step"]) is int
    assert rec["loss"] == 0.25 and type(rec["loss"]) is float


def test_resume_continues_seq_and_keeps_run_id(log: Path) -> None:
    with RunWriter(log) as w:
        for step in range(3):
            w.write("train_step", step=step, loss=0.1)
    first_id = w.run_id
    with RunWriter(log, resume=True) as w2:
        assert w2.run_id == first_id and w2.seq == 3
        w2.write("run_resume", step=3)
    with RunWriter(log, resume=True, run_id="fresh") as w3:
        rec = w3.write("train_step", step=4, loss=0.1)
    assert rec["seq"] == 4 and rec["run_id"] == "fresh"
    assert [r["seq"] for r in lines_of(log)] == list(range(5))


def test_resume_on_missing_or_empty_file_starts_at_zero(log: Path) -> None:
    with RunWriter(log, resume=True) as w:
        assert w.write("run_start")["seq"] == 0


def test_existing_log_without_resume_is_refused(log: Path) -> None:
    with RunWriter(log) as w:
        w.write("run_start")
    with pytest.raises(UsageError, match="resume=True"):
        RunWriter(log)
    assert len(lines_of(log)) == 1


def test_resume_after_torn_line_starts_a_new_line(log: Path) -> None:
    with RunWriter(log, run_id="r") as w:
        w.write("train_step", step=1, loss=0.3)
        w.write("train_step", step=2, loss=0.2)
    with open(log, "ab") as fh:
        fh.write(b'{"schema":"gradience.run/1","ts":1.0,"run_id":"r","se')  # crash mid-line
    with RunWriter(log, resume=True) as w:
        assert w.seq == 2
        w.write("train_step", step=3, loss=0.1)
    got = [r.seq for r in iter_records(log)]
    assert got == [0, 1, 2]


def test_resume_reads_the_tail_past_a_large_last_record(log: Path) -> None:
    modules = {f"layer.{i}.q_proj": {"sigma_max": float(i)} for i in range(5000)}
    with RunWriter(log) as w:
        w.write("train_step", step=1, loss=0.3)
        w.write("metrics", step=1, kind="structural", reason="final", metrics={}, modules=modules)
    assert log.stat().st_size > 2 * 65536
    last = read_last_record(log)
    assert last is not None and last.seq == 1 and len(last.data["modules"]) == 5000


def test_write_rejects_bad_records(log: Path) -> None:
    with RunWriter(log) as w:
        with pytest.raises(UsageError, match="unknown telemetry event"):
            w.write("trian_step", step=1)
        with pytest.raises(UsageError, match="set by the writer"):
            w.write("train_step", step=1, seq=4)
        with pytest.raises(UsageError, match="split"):
            w.write("eval", step=1, metrics={})
        with pytest.raises(UsageError, match="status"):
            w.write("run_end", status="done")
        with pytest.raises(UsageError, match="reason"):
            w.write("metrics", step=1, kind="structural", metrics={}, reason="whim")
        with pytest.raises(UsageError, match="step"):
            w.write("train_step", step=True)
        assert w.write("run_start")["seq"] == 0  # rejected records consume no seq
    with pytest.raises(TelemetryError, match="after close"):
        w.write("run_start")


# --- sanitize --------------------------------------------------------------------------


def test_nonfinite_become_null_with_paths() -> None:
    rec: dict[str, Any] = {
        "metrics": {"loss": float("nan"), "acc": 0.5},
        "modules": {"layer.0.q": {"sigma_max": np.float64("inf")}},
        "hist": np.array([1.0, -np.inf, 2.0]),
        "scalar": np.float32("nan"),
    }
    out = sanitize(rec)
    assert out["metrics"] == {"loss": None, "acc": 0.5}
    assert out["hist"] == [1.0, None, 2.0]
    assert out["nonfinite"] == [
        "metrics.loss",
        'modules["layer.0.q"].sigma_max',
        "hist[1]",
        "scalar",
    ]
    assert all(resolve(out, p) is None for p in out["nonfinite"])
    assert math.isnan(rec["metrics"]["loss"])  # input untouched
    json.dumps(out, allow_nan=False)


def test_finite_record_gets_no_nonfinite_key() -> None:
    assert "nonfinite" not in sanitize({"metrics": {"loss": 0.1}})


def test_numpy_values_become_python() -> None:
    out = sanitize({"a": np.arange(3), "b": np.bool_(True), "c": np.int32(4), "d": (1, 2)})
    assert out == {"a": [0, 1, 2], "b": True, "c": 4, "d": [1, 2]}
    assert type(out["c"]) is int and type(out["b"]) is bool


def test_long_strings_redacted_unless_opted_in() -> None:
    assert sanitize({"s": "x" * 256})["s"] == "x" * 256
    assert sanitize({"s": "x" * 257})["s"] == "<redacted: 257 chars>"
    assert sanitize({"s": ["y" * 1000]})["s"] == ["<redacted: 1000 chars>"]
    assert sanitize({"s": "x" * 257}, allow_raw_text=True)["s"] == "x" * 257


def test_raw_text_opt_in_through_writer(log: Path) -> None:
    prompt = "tell me a story " * 40
    with RunWriter(log, allow_raw_text=True) as w:
        w.write("run_start", prompt=prompt)
    assert lines_of(log)[0]["prompt"] == prompt


@pytest.mark.parametrize(
    "key",
    ["token", "hf_token", "HF_TOKEN", "access_token", "password", "db_passwd", "api_key",
     "apiKey", "APIKEY", "client_secret", "Authorization", "credentials", "private_key",
     "privateKey"],
)  # fmt: skip
def test_secret_keys_always_redacted(key: str) -> None:
    assert is_secret_key(key)
    out = sanitize({"config": {key: "hunter2", "nested": [{key: {"a": 1}}]}}, allow_raw_text=True)
    assert out["config"][key] == "<redacted>"
    assert out["config"]["nested"][0][key] == "<redacted>"


# TRL 1.16's SFTTrainer train/eval metric names (issue 10, finding 1: `mean_token_accuracy`
# was written as "<redacted>"), and tokenizer settings that name a special token.
TRL_METRICS = ["mean_token_accuracy", "eval_mean_token_accuracy", "num_tokens", "eval_num_tokens", "entropy",
               "eval_entropy", "token_f1", "token_accuracy", "rewards/accuracies", "completions/mean_length"]


@pytest.mark.parametrize(
    "key", ["num_tokens", "tokens_per_second", "max_new_tokens", "tokenizer", "secretary_bird", "pad_token",
            "eos_token", "pad_token_id", *TRL_METRICS],
)  # fmt: skip
def test_metric_names_are_not_mistaken_for_secrets(key: str) -> None:
    assert not is_secret_key(key)
    assert sanitize({key: 5})[key] == 5
    assert sanitize({"metrics": {key: 0.5}})["metrics"][key] == 0.5


HF = "hf_" + "aB3" * 12
SECRET_VALUES = [HF, "sk-proj-" + "x1" * 16, "ghp_" + "Z9" * 18, "github_pat_" + "a_" * 15, "AKIA" + "A1B2" * 4]


@pytest.mark.parametrize("secret", SECRET_VALUES)
def test_secret_looking_values_are_redacted_anywhere(secret: str) -> None:
    out = sanitize({"note": f"pushed with {secret}, then stopped", "args": ["--token", secret],
                    "cmd": f"python train.py --hub-token={secret} --lr 1e-4"})  # fmt: skip
    assert secret not in json.dumps(out)
    assert out["note"] == "pushed with <redacted>, then stopped" and out["args"] == ["--token", "<redacted>"]
    assert out["cmd"] == "python train.py --hub-token=<redacted> --lr 1e-4"


def test_bearer_tokens_and_secret_keys_are_redacted() -> None:
    out = sanitize({"headers": "Authorization: Bearer abc.DEF-123_xyz", HF: 1.0})
    assert out == {"headers": "Authorization: Bearer <redacted>", "<redacted>": 1.0}


def test_keys_are_sanitised_like_values() -> None:
    out = sanitize({"/home/alice/data/train.jsonl": 3, "loss on /home/alice/data/dev.jsonl": 0.5})
    assert out == {"train.jsonl": 3, "loss on dev.jsonl": 0.5}


def test_a_path_inside_a_command_line_is_redacted_in_place() -> None:
    cmd = "/usr/bin/python /home/alice/src/train.py --output_dir /home/alice/runs/a --data=/srv/d/x.json -v"
    assert sanitize({"cmd": cmd})["cmd"] == "python train.py --output_dir a --data=x.json -v"
    assert sanitize({"p": "/home/alice/My Runs/a"})["p"] == "a"  # one path with a space: still one path
    assert sanitize({"u": "see https://huggingface.co/acme/model"})["u"] == "see https://huggingface.co/acme/model"


def test_paths_and_host_are_dropped_by_default() -> None:
    rec = {
        "output_dir": "/home/alice/runs/toy",
        "trailing": "/home/alice/runs/toy/",
        "windows": "C:\\Users\\bob\\model",
        "relative": "runs/toy",
        "note": "saved to /home/alice/runs/toy/adapter on gpu-node-17.cluster",
        "url": "https://huggingface.co/org/model",
    }
    out = sanitize(rec, host_names=["gpu-node-17.cluster", "gpu-node-17"])
    assert out["output_dir"] == "toy" and out["trailing"] == "toy"
    assert out["windows"] == "model"
    assert out["relative"] == "runs/toy"
    assert out["note"] == "saved to adapter on <host>"
    assert out["url"] == rec["url"]
    kept = sanitize(rec, record_paths=True, host_names=["gpu-node-17"])
    assert kept == rec


def test_writer_drops_paths_unless_record_paths(log: Path) -> None:
    with RunWriter(log) as w:
        w.write("run_start", output_dir=str(log.parent))
    assert lines_of(log)[0]["output_dir"] == "toy"
    other = log.with_name("other.jsonl")
    with RunWriter(other, record_paths=True) as w:
        w.write("run_start", output_dir=str(log.parent))
    assert lines_of(other)[0]["output_dir"] == str(log.parent)


def test_odd_objects_still_serialise() -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing"

    loop: dict[str, Any] = {}
    loop["self"] = loop
    out = sanitize({"p": Path("rel/x"), "t": Thing(), "b": b"\x00\x01", 3: "int key", "l": loop})
    assert out["p"] == "rel/x" and out["t"] == "thing" and out["3"] == "int key"
    assert out["b"] == "<redacted: 2 bytes>"
    json.dumps(out, allow_nan=False)


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.builds(np.float32, st.floats(width=32)),
    st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
    st.lists(st.floats(), max_size=4).map(np.array),
)
json_tree = st.recursive(
    json_leaf,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), json_tree, max_size=5), st.booleans())
def test_sanitize_output_is_strict_json_and_paths_point_at_nulls(
    record: dict[str, Any], raw: bool
) -> None:
    out = sanitize(record, allow_raw_text=raw)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == json.loads(text)  # round-trips (no NaN != NaN)
    for path in out.get("nonfinite", []):
        assert resolve(out, path) is None
        assert format_path(parse_path(path)) == path


@given(st.lists(st.one_of(st.text(), st.integers(0, 10**6)), min_size=1, max_size=6))
def test_path_notation_round_trips(parts: list[str | int]) -> None:
    assert parse_path(format_path(parts)) == parts


# --- append_record_atomic --------------------------------------------------------------


def test_atomic_append_keeps_original_bytes(log: Path) -> None:
    with RunWriter(log, run_id="r9") as w:
        w.write("run_start")
        w.write("train_step", step=1, loss=float("nan"))
        w.write("run_end", step=1, status="ok")
    before = log.read_bytes()
    inode = log.stat().st_ino
    rec = append_record_atomic(log, "metrics", step=1, kind="lora_audit", metrics={"x": 1.0})
    after = log.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    assert rec["seq"] == 3 and rec["run_id"] == "r9"
    assert json.loads(after[len(before) :]) == rec
    assert log.stat().st_ino != inode  # replaced, not edited in place
    assert sorted(p.name for p in log.parent.iterdir()) == ["run.jsonl"]


def test_atomic_append_after_torn_line(log: Path) -> None:
    with RunWriter(log, run_id="r") as w:
        w.write("run_start")
    with open(log, "ab") as fh:
        fh.write(b'{"torn')
    before = log.read_bytes()
    append_record_atomic(log, "recommendation", step=None, code="RANK", message="use r=8")
    after = log.read_bytes()
    assert after.startswith(before + b"\n")
    assert [r.event for r in iter_records(log)] == ["run_start", "recommendation"]


def test_atomic_append_failure_leaves_log_untouched(
    log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RunWriter(log) as w:
        w.write("run_start")
    before = log.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod.os, "replace", boom)
    with pytest.raises(TelemetryError, match="No space left"):
        append_record_atomic(log, "alert", severity="warning", code="X", message="m")
    assert log.read_bytes() == before
    assert sorted(p.name for p in log.parent.iterdir()) == ["run.jsonl"]


def test_atomic_append_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UsageError) as info:
        append_record_atomic(missing, "run_end", status="ok")
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"not json\n")
    with pytest.raises(TelemetryError, match="no valid record"):
        append_record_atomic(junk, "run_end", status="ok")
    assert junk.read_bytes() == b"not json\n"


def test_atomic_append_keeps_file_mode(log: Path) -> None:
    with RunWriter(log) as w:
        w.write("run_start")
    os.chmod(log, 0o640)
    append_record_atomic(log, "run_end", status="aborted")
    assert log.stat().st_mode & 0o777 == 0o640
