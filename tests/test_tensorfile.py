"""TensorFile: validating, positioned reads of safetensors files and weights-only `.bin`."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file as save_numpy

from gradience.errors import AdapterError, UsageError
from gradience.lora.safetensors_file import TensorFile

torch = pytest.importorskip("torch")
from safetensors.torch import save_file as save_torch  # noqa: E402


def _raw(path: Path, header: Any, data: bytes = b"", declared: int | None = None) -> Path:
    """A safetensors file byte by byte; `header` is a dict (JSON-encoded) or raw bytes."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def _assert_one_line_naming(exc: pytest.ExceptionInfo[Exception], path: Path) -> str:
    message = str(exc.value)
    assert str(path) in message
    assert "\n" not in message
    return message


# --- bad input -----------------------------------------------------------------------------


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(UsageError) as exc:
        TensorFile(path)
    assert "not found" in _assert_one_line_naming(exc, path)


def test_directory_instead_of_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        TensorFile(tmp_path)
    _assert_one_line_naming(exc, tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x01\x02\x03\x04\x05\x06\x07"])
def test_file_shorter_than_eight_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    assert "shorter than 8 bytes" in _assert_one_line_naming(exc, path)


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = _raw(tmp_path / "big.safetensors", {}, declared=1000)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    message = _assert_one_line_naming(exc, path)
    assert "1000" in message and "header" in message


def test_absurd_header_length_is_refused_before_reading(tmp_path: Path) -> None:
    path = _raw(tmp_path / "huge.safetensors", {}, declared=2**63)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    _assert_one_line_naming(exc, path)


@pytest.mark.parametrize(
    "header",
    [b"notjs", b'{"a": ', b"\xff\xfe\xfd", b"[1, 2, 3]", b'"just a string"', b""],
    ids=["not-json", "cut-json", "not-utf8", "json-list", "json-string", "empty"],
)
def test_header_that_is_not_a_json_object(tmp_path: Path, header: bytes) -> None:
    path = _raw(tmp_path / "bad.safetensors", header)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    assert "header" in _assert_one_line_naming(exc, path)


def test_tensor_past_the_end_of_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_numpy({"a": np.ones((4, 4), np.float32), "b": np.ones((8, 8), np.float32)}, str(path))
    TensorFile(path)  # intact
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 4)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    message = _assert_one_line_naming(exc, path)
    assert "past the end" in message
    assert "'a'" in message or "'b'" in message


def test_truncated_between_open_and_read(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_numpy({"a": np.arange(16, dtype=np.float32)}, str(path))
    tf = TensorFile(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 4)
    with pytest.raises(AdapterError) as exc:
        tf.read("a")
    assert "truncated" in _assert_one_line_naming(exc, path)


@pytest.mark.parametrize(
    ("entry", "data_len", "fragment"),
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, 12, "12 bytes for shape [2, 2] F32"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 20]}, 20, "20 bytes"),
        ({"dtype": "BF16", "shape": [3], "data_offsets": [0, 12]}, 12, "BF16"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, 8, "malformed shape or offsets"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, 8, "malformed shape or offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, 8, "malformed shape or offsets"),
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, 8, "unsupported dtype 'C64'"),
        ({"dtype": "F32", "shape": [1]}, 4, "malformed header entry"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, 4, "malformed header entry"),
        ({"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}, 4, "malformed header entry"),
        ([1, 2, 3], 4, "malformed header entry"),
    ],
)
def test_header_entry_inconsistent_with_its_data(
    tmp_path: Path, entry: Any, data_len: int, fragment: str
) -> None:
    path = _raw(tmp_path / "t.safetensors", {"w": entry}, b"\0" * data_len)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    message = _assert_one_line_naming(exc, path)
    assert "'w'" in message
    assert fragment in message


def test_metadata_is_not_a_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_numpy({"w": np.ones(3, np.float32)}, str(path), metadata={"format": "pt"})
    assert TensorFile(path).names == ["w"]


# --- dtypes and round trips ----------------------------------------------------------------


def test_bf16_round_trip_through_ml_dtypes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    t = torch.randn(5, 7).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_torch({"w": t}, str(path))
    tf = TensorFile(path)
    info = tf.info("w")
    assert (info.dtype, info.shape, info.numel) == ("BF16", (5, 7), 35)
    got = tf.read("w")
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    assert got.shape == (5, 7)
    np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
    # and bit for bit
    np.testing.assert_array_equal(got.view(np.int16), t.view(torch.int16).numpy())


@pytest.mark.parametrize(
    ("torch_dtype", "tag"),
    [
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"),
        ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
        ("int64", "I64"), ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"),
        ("bool", "BOOL"),
    ],
)
def test_every_supported_dtype_round_trips(tmp_path: Path, torch_dtype: str, tag: str) -> None:
    torch.manual_seed(0)
    t = (4 * torch.randn(3, 4)).to(getattr(torch, torch_dtype))
    path = tmp_path / "t.safetensors"
    save_torch({"t": t}, str(path))
    tf = TensorFile(path)
    assert tf.info("t").dtype == tag
    got = tf.read("t")
    np.testing.assert_array_equal(got.astype(np.float64), t.to(torch.float64).numpy())


def test_scalar_and_empty_tensors(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    save_numpy({"s": np.array(2.5, np.float32), "e": np.zeros((0, 3), np.float32)}, str(path))
    tf = TensorFile(path)
    assert tf.read("s").shape == () and float(tf.read("s")) == 2.5
    assert tf.info("s").numel == 1
    assert tf.read("e").shape == (0, 3)
    assert tf.info("e").numel == 0


# --- positioned reads -----------------------------------------------------------------------


def _owner(a: np.ndarray) -> Any:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.base


def test_reads_are_positioned_and_not_memory_mapped(tmp_path: Path) -> None:
    small = np.arange(6, dtype=np.float32).reshape(2, 3)
    big = np.full((512, 1024), 7.0, dtype=np.float32)  # 2 MiB
    path = tmp_path / "two.safetensors"
    save_numpy({"big": big, "small": small}, str(path))
    tf = TensorFile(path)
    got = tf.read("small")
    np.testing.assert_array_equal(got, small)
    # the returned array is backed by exactly this tensor's bytes, not the file
    owner = _owner(got)
    assert isinstance(owner, bytes) and len(owner) == small.nbytes

    # Overwrite the big tensor's bytes on disk: the small one still reads the same, the big
    # one reads the new bytes (nothing cached) and the earlier array is untouched (no mmap).
    info = tf.info("big")
    before = tf.read("big")
    with open(path, "r+b") as fh:
        fh.seek(info.start)
        fh.write(np.full(big.shape, -1.0, np.float32).tobytes())
    np.testing.assert_array_equal(tf.read("small"), small)
    np.testing.assert_array_equal(tf.read("big"), np.full(big.shape, -1.0, np.float32))
    np.testing.assert_array_equal(before, big)


def test_offsets_point_inside_the_data_section(tmp_path: Path) -> None:
    arrays = {f"t{i}": np.full((i + 1, 3), float(i), np.float64) for i in range(5)}
    path = tmp_path / "many.safetensors"
    save_numpy(arrays, str(path))
    tf = TensorFile(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    spans = sorted((tf.info(k).start, tf.info(k).end) for k in tf.names)
    assert spans[0][0] == 8 + n and spans[-1][1] == path.stat().st_size
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap
    assert sorted(tf.names) == sorted(arrays)
    assert sorted(i.name for i in tf) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(tf.read(k), v)


# --- torch .bin ------------------------------------------------------------------------------


class NotATensor:
    """Pickled by reference: a weights-only load must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {
        "a.lora_A.weight": torch.randn(4, 8),
        "a.lora_B.weight": torch.randn(8, 4).to(torch.bfloat16),
        "step": 3,  # a non-tensor entry is skipped
    }
    path = tmp_path / "adapter_model.bin"
    torch.save(state, path)
    tf = TensorFile(path)
    assert sorted(tf.names) == ["a.lora_A.weight", "a.lora_B.weight"]
    assert tf.info("a.lora_A.weight").shape == (4, 8)
    np.testing.assert_array_equal(tf.read("a.lora_A.weight"), state["a.lora_A.weight"].numpy())
    got_b = tf.read("a.lora_B.weight")
    assert got_b.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got_b.astype(np.float32), state["a.lora_B.weight"].float().numpy())


def test_bin_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "obj": NotATensor()}, path)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    message = _assert_one_line_naming(exc, path)  # torch's own refusal spans many lines
    assert "weights_only" in message and "NotATensor" in message
    assert "\x1b" not in message  # no terminal colour codes


def test_bin_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.bin"
    torch.save([torch.ones(2)], path)
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    assert "state dict" in _assert_one_line_naming(exc, path)


def test_bin_that_is_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(AdapterError) as exc:
        TensorFile(path)
    assert "weights_only" in _assert_one_line_naming(exc, path)
