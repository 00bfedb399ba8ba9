"""Fuzzing the adapter reader: mutated safetensors headers and adapter configs.

A small valid adapter (tests/factories.write_adapter) is damaged one way per example: the
8-byte header length, the header's JSON bytes (truncated, bytes flipped), its entries
(dtypes, shapes, offsets out of range or overlapping, huge shapes) or adapter_config.json
(wrong types, missing keys). Whatever the damage, `audit` must return a report or raise a
`GradienceError`: never another exception, never a hang (hypothesis' deadline bounds each
example), never a huge allocation (tracemalloc bounds the peak).
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradience.errors import GradienceError
from gradience.mechanic.audit import AuditReport, audit
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

MAX_PEAK = 32 * 2**20  # the adapter is ~10 kB; anything near this is a size taken on trust
FUZZ = settings(
    max_examples=40,
    deadline=2000,  # ms per example: a hang or a quadratic blow-up fails here
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SPEC = AdapterSpec(
    modules={
        "model.layers.0.self_attn.q_proj": ModuleSpec(12, 16, [3.0, 1.0, 0.5]),
        "model.layers.1.mlp.down_proj": ModuleSpec(16, 10, [2.0, 0.2]),
    },
    r=4, lora_alpha=8.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    """(weights file bytes, config dict) of a valid adapter."""
    d = write_adapter(tmp_path_factory.mktemp("pristine"), SPEC, dtype=np.float32)
    return (d / "adapter_model.safetensors").read_bytes(), json.loads((d / "adapter_config.json").read_text())


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: Any, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _check(directory: Path, weights: bytes, config: bytes) -> None:
    """The invariant: a report or a GradienceError, with a bounded allocation."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_bytes(config)
    tracemalloc.start()
    try:
        report = audit(directory)
    except GradienceError as exc:
        assert str(exc), "an error must say what failed"
        assert "\n" not in str(exc)
    else:
        assert isinstance(report, AuditReport)
        json.dumps(report.to_dict(), allow_nan=False)  # what `--json` prints: finite numbers only
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MAX_PEAK, f"peak allocation {peak / 2**20:.1f} MiB"


_counter = iter(range(10**9))


def _fresh(tmp_path: Path) -> Path:
    return tmp_path / f"case{next(_counter)}"


# --- the 8-byte length and the raw header bytes ------------------------------------------


@FUZZ
@given(st.one_of(st.integers(0, 2**64 - 1), st.integers(-64, 64)))
def test_header_length_field(tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], n: int) -> None:
    blob, config = pristine
    (declared,) = struct.unpack("<Q", blob[:8])
    value = n if n > 64 else max(0, declared + n)  # small values: off by a few bytes
    _check(_fresh(tmp_path), struct.pack("<Q", value % 2**64) + blob[8:], json.dumps(config).encode())


@FUZZ
@given(st.data())
def test_truncated_files(tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], data: st.DataObject) -> None:
    blob, config = pristine
    cut = data.draw(st.integers(0, len(blob) - 1))
    _check(_fresh(tmp_path), blob[:cut], json.dumps(config).encode())


@FUZZ
@given(st.data())
def test_flipped_header_bytes(tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], data: st.DataObject) -> None:
    blob, config = pristine
    (n,) = struct.unpack("<Q", blob[:8])
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(8, 8 + n - 1))
        out[pos] = data.draw(st.integers(0, 255))
    _check(_fresh(tmp_path), bytes(out), json.dumps(config).encode())


@FUZZ
@given(st.binary(max_size=64), st.booleans())
def test_header_replaced_by_arbitrary_bytes(
    tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], raw: bytes, keep_data: bool
) -> None:
    blob, config = pristine
    _, data = _split(blob)
    _check(_fresh(tmp_path), struct.pack("<Q", len(raw)) + raw + (data if keep_data else b""),
           json.dumps(config).encode())  # fmt: skip


# --- structured header entries -------------------------------------------------------------

_junk = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.floats(allow_nan=False),
    st.integers(-(2**70), 2**70), st.lists(st.integers(-3, 3), max_size=3), st.just({}),
)  # fmt: skip
_dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "C64", "f32", ""])
_dims = st.one_of(
    st.integers(0, 32), st.integers(-2, -1), st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63, 2**64]),
)  # fmt: skip
_shapes = st.one_of(st.lists(_dims, max_size=4), _junk)


@st.composite
def _entry_mutation(draw: st.DrawFn) -> Callable[[dict[str, Any], int], None]:
    """A function that damages one header entry in place, given the data section's size."""
    field = draw(st.sampled_from(
        ["dtype", "shape", "data_offsets", "drop", "replace", "overlap", "huge", "empty", "reshape"]
    ))  # fmt: skip
    value = draw({"dtype": _dtypes | _junk, "shape": _shapes}.get(field, _junk))
    lo = draw(st.integers(-2, 2**40) | st.integers(0, 4096))
    hi = draw(st.integers(-2, 2**40) | st.integers(0, 4096))
    offsets_kind = draw(st.integers(0, 4))
    dropped = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    big = draw(st.sampled_from(
        [[2**32, 2**32], [2**62, 4], [2**33, 2**31, 0], [2**30, 2**31, 0], [2**63, 2], [2**64]]
    ))  # fmt: skip
    empty = draw(st.sampled_from([[0, 16], [4, 0], [0], [0, 0, 3], []]))
    how = draw(st.sampled_from(["transpose", "flatten", "conv", "split"]))

    def mutate(entry: dict[str, Any], size: int) -> None:
        if field in ("dtype", "shape"):
            entry[field] = value
        elif field == "data_offsets":
            entry[field] = [[lo, hi], [lo], [lo, hi, 0], value, [0, size + 4]][offsets_kind]
        elif field == "drop":
            entry.pop(dropped, None)
        elif field == "replace":
            entry.clear()
            entry["x"] = value
        elif field == "overlap":  # every tensor starts at byte 0 of the data section
            offsets = entry.get("data_offsets")  # an earlier edit may have broken it already
            ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            start, end = offsets if ok else (0, 0)
            entry["data_offsets"] = [0, end - start]
        elif field == "huge":  # a huge shape whose byte count wraps to 0 in 64-bit arithmetic
            entry["shape"] = big
            entry["data_offsets"] = [0, 0]
        elif field == "empty":  # a zero-size (or scalar) tensor, consistent with its offsets
            entry["shape"] = empty
            offsets = entry.get("data_offsets")
            start = offsets[0] if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) else 0
            entry["data_offsets"] = [start, start + (4 if empty == [] else 0)]
        elif isinstance(entry.get("shape"), list) and len(entry["shape"]) == 2:
            rows, cols = entry["shape"]  # same bytes, another layout
            entry["shape"] = {"transpose": [cols, rows], "flatten": [rows * cols],
                              "conv": [rows, cols, 1, 1], "split": [rows * cols // 2, 2]}[how]  # fmt: skip

    return mutate


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 3), _entry_mutation()), min_size=1, max_size=3))
def test_mutated_header_entries(
    tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], edits: list[tuple[int, Any]]
) -> None:
    blob, config = pristine
    header, data = _split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    for index, mutate in edits:
        mutate(header[names[index % len(names)]], len(data))
    _check(_fresh(tmp_path), _join(header, data), json.dumps(config).encode())


@FUZZ
@given(_junk | st.lists(_junk, max_size=2), st.sampled_from(["entry", "metadata", "whole", "extra"]))
def test_header_entries_of_the_wrong_type(
    tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], value: Any, where: str
) -> None:
    blob, config = pristine
    header, data = _split(blob)
    if where == "entry":
        header[sorted(header)[0]] = value
    elif where == "metadata":
        header["__metadata__"] = value
    elif where == "whole":
        header = value
    else:
        header["base_model.model.x.lora_A.weight"] = value
    _check(_fresh(tmp_path), _join(header, data), json.dumps(config).encode())


# --- adapter_config.json ----------------------------------------------------------------

_config_values = st.one_of(
    _junk, st.just(float("inf")), st.just(float("nan")), st.just(-1), st.just(0), st.just(4), st.just(4.0),
    st.just("4"), st.dictionaries(st.sampled_from(["q_proj", "down_proj", "layers.0.", "(", "x"]), _junk, max_size=2),
)  # fmt: skip
_config_keys = st.sampled_from([
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "peft_type",
    "fan_in_fan_out", "target_modules", "base_model_name_or_path", "task_type",
])  # fmt: skip


@FUZZ
@given(st.dictionaries(_config_keys, _config_values, max_size=3), st.lists(_config_keys, max_size=3))
def test_mutated_configs(
    tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], changes: dict[str, Any], dropped: list[str]
) -> None:
    blob, config = pristine
    config = {**config, **changes}
    for key in dropped:
        config.pop(key, None)
    _check(_fresh(tmp_path), blob, json.dumps(config).encode())  # NaN/Infinity as Python writes them


@FUZZ
@given(st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"[" * 100_000, b'{"r": 1' + b"0" * 5000 + b"}", b'{"r": 1e999}',
                     b'{"rank_pattern": {"q_proj": Infinity}}', b"\xff\xfe{}", b"null", b"[]"]),
))  # fmt: skip
def test_config_files_that_are_not_configs(
    tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], raw: bytes
) -> None:
    blob, _ = pristine
    _check(_fresh(tmp_path), blob, raw)


def test_a_deeply_nested_header_is_an_adapter_error(tmp_path: Path, pristine: tuple[bytes, dict[str, Any]]) -> None:
    raw = b"[" * 100_000
    _check(tmp_path / "deep", struct.pack("<Q", len(raw)) + raw, json.dumps(pristine[1]).encode())


@pytest.mark.parametrize(
    "changes",
    [
        {"lora_alpha": float("nan")}, {"lora_alpha": float("inf")}, {"r": float("inf")},
        {"alpha_pattern": {"q_proj": float("nan")}}, {"rank_pattern": {"q_proj": float("inf")}},
        {"r": 0}, {"rank_pattern": {"q_proj": 0}}, {"r": "four"}, {"rank_pattern": ["q_proj"]},
    ],
)  # fmt: skip
def test_non_finite_and_ill_typed_settings(
    tmp_path: Path, pristine: tuple[bytes, dict[str, Any]], changes: dict[str, Any]
) -> None:
    blob, config = pristine
    _check(tmp_path / "case", blob, json.dumps({**config, **changes}).encode())
