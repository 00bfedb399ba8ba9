"""Property tests that complement the per-module ones: random shapes for the spectral core,
regex-special pattern keys for PEFT's matching rule, and hostile line encodings for the
run-log reader.

What already lives elsewhere is not repeated: fixed-shape dense-SVD agreement and the
scalar A/B balance (tests/test_spectrum.py), PEFT-like regex keys over dotted names
(tests/test_adapter.py), garbage lines interleaved with valid records
(tests/test_telemetry_reader.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradience.errors import TelemetryError
from gradience.lora.reader import pattern_key
from gradience.spectrum import core_singular_values
from gradience.telemetry import ENVELOPE_FIELDS, SCHEMA, ReadProblems, iter_records

# Keys such as "[[" make `re` warn about a future syntax change; that is not under test.
pytestmark = pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")

# --- spectral core: random shapes, ranks and scales -------------------------------------

dims = st.integers(1, 24)
ranks = st.integers(1, 10)
seeds = st.integers(0, 2**32 - 1)
decades = st.floats(-6.0, 6.0)  # scales and magnitudes over twelve decades


def _factors(seed: int, out_f: int, in_f: int, r: int, magnitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian factors with column norms spread over two decades (rank may exceed min(in, out))."""
    rng = np.random.default_rng(seed)
    spread = np.logspace(0, -2, r)
    a = rng.standard_normal((r, in_f)) * spread[:, None]
    b = rng.standard_normal((out_f, r)) * 10.0**magnitude
    return a, b


def _assert_same_spectrum(got: np.ndarray, want: np.ndarray, rtol: float = 1e-8) -> None:
    # Both are backward stable: errors are relative to σ₁, not to each σᵢ.
    top = float(np.max(want, initial=0.0))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * top + 1e-300)


@settings(max_examples=60, deadline=None)
@given(dims, dims, ranks, decades, decades, seeds)
def test_core_agrees_with_dense_svd_at_random_shapes_and_scales(
    out_f: int, in_f: int, r: int, log_scale: float, magnitude: float, seed: int
) -> None:
    a, b = _factors(seed, out_f, in_f, r, magnitude)
    scale = 10.0**log_scale
    k = min(r, in_f, out_f)
    dense = np.linalg.svd(scale * (b @ a), compute_uv=False)[:k]
    got = core_singular_values(a, b, scale)
    assert got.shape == (k,)
    assert np.all(np.diff(got) <= 0)
    _assert_same_spectrum(got, dense)


@settings(max_examples=40, deadline=None)
@given(dims, dims, ranks, st.floats(-6.0, 6.0), seeds)
def test_core_is_invariant_to_rescaling_b_against_a(
    out_f: int, in_f: int, r: int, log_c: float, seed: int
) -> None:
    a, b = _factors(seed, out_f, in_f, r, 0.0)
    c = 10.0**log_c
    _assert_same_spectrum(core_singular_values(a / c, b * c), core_singular_values(a, b), 1e-9)


@settings(max_examples=40, deadline=None)
@given(dims, dims, ranks, st.floats(0.0, 3.0), seeds)
def test_core_is_invariant_to_an_invertible_mixing(
    out_f: int, in_f: int, r: int, log_cond: float, seed: int
) -> None:
    # B·A = (B·M)(M⁻¹·A) for any invertible r×r M; M = U·diag(d)·Vᵀ with cond(M) = 10^log_cond.
    a, b = _factors(seed, out_f, in_f, r, 0.0)
    rng = np.random.default_rng(seed + 1)
    u, _ = np.linalg.qr(rng.standard_normal((r, r)))
    v, _ = np.linalg.qr(rng.standard_normal((r, r)))
    d = np.logspace(0, -log_cond, r)
    m = (u * d) @ v.T
    m_inv = (v / d) @ u.T
    want = core_singular_values(a, b)
    # Rounding in M and M⁻¹ costs about cond(M) · eps relative to σ₁.
    _assert_same_spectrum(core_singular_values(m_inv @ a, b @ m), want, 1e-12 * 10**log_cond + 1e-10)


# --- PEFT pattern matching with regex-special characters ---------------------------------


def _peft_rule(keys: list[str], name: str) -> str | None:
    """PEFT's rule, stated independently: the first key with re.match(rf"(.*\\.)?({key})$")."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _compiles(key: str) -> bool:
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error:
        return False
    return True


# Short pieces keep random regexes clear of catastrophic backtracking.
_name_parts = st.text(alphabet="abq0129_-+", min_size=1, max_size=4)
_names = st.lists(_name_parts, min_size=1, max_size=4).map(".".join)
_key_chars = st.text(alphabet="abq019_.\\*+?()[]{}|^$-", min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(st.lists(_key_chars, max_size=4), _names)
def test_pattern_key_follows_peft_for_any_key_that_is_a_regex(keys: list[str], name: str) -> None:
    assume(all(_compiles(k) for k in keys))
    assert pattern_key(keys, name) == _peft_rule(keys, name)


@settings(max_examples=80, deadline=None)
@given(st.lists(_name_parts, min_size=1, max_size=4), st.integers(1, 4), _names)
def test_an_escaped_dotted_suffix_always_matches(parts: list[str], n: int, prefix: str) -> None:
    name = prefix + "." + ".".join(parts)
    suffix = ".".join(parts[-n:])
    assert pattern_key([re.escape(suffix)], name) == re.escape(suffix)
    # ... and never matches mid-segment: a suffix must start at a dot boundary.
    assert pattern_key([re.escape("z" + suffix)], name) is None


@settings(max_examples=80, deadline=None)
@given(st.lists(_key_chars, min_size=1, max_size=4), _names)
def test_a_key_that_is_not_a_regex_is_a_literal_dotted_suffix(keys: list[str], name: str) -> None:
    # PEFT would raise re.error here; gradience falls back to a literal suffix match.
    assume(not all(_compiles(k) for k in keys))
    expected = None
    for key in keys:
        hit = (
            bool(re.match(rf"(.*\.)?({key})$", name))
            if _compiles(key)
            else name == key or name.endswith("." + key)
        )
        if hit:
            expected = key
            break
    assert pattern_key(keys, name) == expected


# --- run-log reader: hostile encodings of every line ------------------------------------

def _record(seq: int, step: int | None, event: str, extra: dict[str, Any]) -> dict[str, Any]:
    envelope = {"schema": SCHEMA, "ts": 1.5, "run_id": "r", "seq": seq, "event": event, "step": step}
    return {**envelope, **extra}


_records = st.builds(
    _record,
    st.integers(0, 10**6),
    st.none() | st.integers(0, 10**6),
    st.sampled_from(["train_step", "eval", "metrics", "whatever"]),
    st.dictionaries(st.sampled_from(["loss", "note", "é"]), st.floats(-1e3, 1e3) | st.text(max_size=5), max_size=2),
)


def _oracle(raw: bytes) -> bool:
    """A UTF-8 line that `json.loads` reads as an object with a well-typed envelope."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError, RecursionError):
        return False
    return (
        isinstance(data, dict) and all(f in data for f in ENVELOPE_FIELDS)
        and type(data["seq"]) is int and data["seq"] >= 0
        and (data["step"] is None or type(data["step"]) is int)
        and type(data["ts"]) in (int, float) and type(data["event"]) is str
        and type(data["run_id"]) is str and data["run_id"] != ""
        and str(data["schema"]).startswith("gradience.run/")
    )  # fmt: skip


@st.composite
def _encoded(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """One line's bytes (no newline) and the record it was made from, encoded some way."""
    record = draw(_records)
    compact = json.dumps(record, separators=(",", ":"), ensure_ascii=draw(st.booleans()))
    how = draw(st.sampled_from(
        ["compact", "spaced", "padded", "crlf", "extra", "two", "latin1", "cut", "bytes", "nan"]
    ))  # fmt: skip
    text = {
        "compact": compact,
        "spaced": json.dumps(record, indent=draw(st.sampled_from([None, 0]))).replace("\n", " "),
        "padded": " \t" + compact + "  ",
        "crlf": compact + "\r",
        "extra": compact + draw(st.sampled_from(["}", " x", ",", "]"])),
        "two": compact + " " + compact,
        "nan": compact[:-1] + ',"x":NaN}',
    }.get(how)
    if text is not None:
        return text.encode("utf-8"), record
    raw = compact.encode("utf-8")
    if how == "latin1":  # a byte that is never valid UTF-8, inside a string value
        return raw.replace(b'"r"', b'"\xff"', 1), record
    if how == "cut":
        return raw[: draw(st.integers(1, len(raw) - 1))], record
    # Never empty: an empty last line without a newline is no line at all.
    return draw(st.binary(max_size=40)).replace(b"\n", b"") or b" ", record


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_encoded(), max_size=12), st.booleans())
def test_reader_yields_exactly_the_lines_json_accepts(
    tmp_path_factory: pytest.TempPathFactory, lines: list[tuple[bytes, dict[str, Any]]], final_newline: bool
) -> None:
    raws = [raw for raw, _ in lines]
    body = b"\n".join(raws) + (b"\n" if final_newline and raws else b"")
    log = tmp_path_factory.mktemp("enc") / "run.jsonl"
    log.write_bytes(body)
    good = [i + 1 for i, raw in enumerate(raws) if _oracle(raw)]
    bad = [i + 1 for i, raw in enumerate(raws) if not _oracle(raw)]

    problems = ReadProblems()
    got = list(iter_records(log, problems=problems))
    assert [r.line_no for r in got] == good
    assert [r.data for r in got] == [json.loads(raws[n - 1]) for n in good]
    assert problems.lines == bad  # each bad line reported once, with its number
    for message in problems.messages():
        assert "\n" not in message

    if bad:
        with pytest.raises(TelemetryError) as exc:
            list(iter_records(log, strict=True))
        message = str(exc.value)
        assert f"{log}:{bad[0]}: " in message and "\n" not in message
    else:
        assert len(list(iter_records(log, strict=True))) == len(good)


def test_crlf_and_padded_lines_are_records(tmp_path: Path) -> None:
    record = {"schema": SCHEMA, "ts": 1.0, "run_id": "r", "seq": 0, "event": "eval", "step": 1}
    text = json.dumps(record)
    log = tmp_path / "run.jsonl"
    log.write_bytes(f"{text}\r\n  {text}\t\n{text} {text}\n".encode())
    problems = ReadProblems()
    assert [r.line_no for r in iter_records(log, problems=problems)] == [1, 2]
    assert problems.lines == [3]


def test_an_integer_beyond_float_range_is_not_a_number(tmp_path: Path) -> None:
    # Python's json reads `1000...0` (400 digits) as an exact int; float() of it overflows.
    from gradience.analysis.align import load_run
    from gradience.runlog.monitor import monitor

    env = {"schema": SCHEMA, "ts": 1.0, "run_id": "r"}
    huge = 10**400
    lines = [
        {**env, "seq": 0, "event": "train_step", "step": 1, "loss": huge, "lr": 0.1},
        {**env, "seq": 1, "event": "eval", "step": 1, "split": "test", "metrics": {"loss": huge}},
        {**env, "seq": 2, "event": "eval", "step": 2, "split": "test", "metrics": {"loss": 0.5}},
        {**env, "seq": 3, "event": "metrics", "step": 2, "kind": "structural",
         "metrics": {"frobenius_norm": huge, "stable_rank": 2.0}},
    ]  # fmt: skip
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = monitor(log)
    assert report.train.latest["loss"] is None and report.train.latest["lr"] == 0.1
    run = load_run(log, train_fields=["train_loss", "lr"])
    assert run.eval_loss.steps.tolist() == [2]
    assert "frobenius_norm" not in run.structural and "train_loss" not in run.train
