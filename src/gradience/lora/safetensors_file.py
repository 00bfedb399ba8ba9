"""Lazy, validating access to the tensors of a safetensors file (or a torch `.bin`).

safetensors is an 8-byte little-endian header length, a JSON header mapping names to
dtype, shape and byte offsets, then the raw bytes. We parse the header ourselves so that a
corrupt or truncated file gets a precise message, and read each tensor with one positioned
read: nothing is memory-mapped, so resident memory stays at one module's worth of bytes
however large the file is.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import ml_dtypes
import numpy as np

from gradience.errors import AdapterError, UsageError, require

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
_MAX_BYTES = 2**63 - 1  # numpy's limit on an array's size in bytes (even an empty one)


def safetensors_dtypes() -> Mapping[str, np.dtype[Any]]:
    """The dtypes this reader understands: safetensors name (`"BF16"`) -> numpy dtype (read-only)."""
    return MappingProxyType({name: np.dtype(t) for name, t in _DTYPES.items()})


def safetensors_dtype_names() -> Mapping[np.dtype[Any], str]:
    """The inverse table, for writers: numpy dtype -> safetensors name (read-only).

    Example:
        >>> safetensors_dtype_names()[np.dtype(np.float32)]
        'F32'
    """
    return MappingProxyType({np.dtype(t): name for name, t in _DTYPES.items()})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and what it is."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorFile:
    """A weights file opened for lazy reads: `.names`, `.info(name)`, `.read(name)`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{self.path}: weights file not found")
        self._torch_state: dict[str, Any] | None = None
        if self.path.suffix == ".bin":
            self._infos = self._load_bin()
        else:
            self._infos = self._parse_header()

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    def read(self, name: str) -> np.ndarray:
        """The tensor's values in their stored dtype (bf16 through ml_dtypes)."""
        info = self._infos[name]
        if self._torch_state is not None:
            return _torch_to_numpy(self._torch_state[name])
        dtype = np.dtype(_DTYPES[info.dtype])
        with open(self.path, "rb") as fh:
            fh.seek(info.start)
            raw = fh.read(info.end - info.start)
        if len(raw) != info.end - info.start:
            raise AdapterError(f"{self.path}: tensor {name!r} is truncated (file ends early)")
        return np.frombuffer(raw, dtype=dtype).reshape(info.shape)

    def _parse_header(self) -> dict[str, TensorInfo]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise AdapterError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise AdapterError(
                    f"{self.path}: corrupt or truncated safetensors header "
                    f"(declares {n} header bytes, file has {size})"
                )
            raw = fh.read(n)
            try:
                header = json.loads(raw.decode("utf-8"))
            except RecursionError:
                raise AdapterError(f"{self.path}: corrupt safetensors header (nested too deep)") from None
            except ValueError as exc:  # bad UTF-8, bad JSON, an integer of thousands of digits
                raise AdapterError(f"{self.path}: corrupt safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise AdapterError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        if raw[:1] != b"{":  # safetensors' own check (InvalidHeaderStart)
            raise AdapterError(f"{self.path}: corrupt safetensors header (does not start with '{{')")
        base = 8 + n
        infos = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            infos[name] = self._check_entry(name, entry, base, size)
        self._check_layout(infos, base, size)
        return infos

    def _check_layout(self, infos: Mapping[str, TensorInfo], base: int, size: int) -> None:
        """safetensors' own rule: sorted by offset, the tensors tile [0, end) with no overlap or
        hole, and the file ends where the last tensor does (no trailing bytes)."""
        end = base
        for info in sorted(infos.values(), key=lambda t: (t.start, t.end)):
            if info.start != end:
                what = "overlaps the tensor before it" if info.start < end else f"leaves a hole of {info.start - end} bytes before it"
                raise AdapterError(
                    f"{self.path}: tensor {info.name!r} {what} (data_offsets must be contiguous); "
                    "safetensors refuses this file"
                )
            end = info.end
        if end != size:
            raise AdapterError(
                f"{self.path}: {size - end} bytes after the last tensor; safetensors refuses this file"
            )

    def _check_entry(self, name: str, entry: Any, base: int, size: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            lo, hi = int(lo), int(hi)
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{where} has a malformed header entry") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise AdapterError(f"{where} has unsupported dtype {dtype!r}")
        if any(d < 0 for d in shape) or lo < 0 or hi < lo:
            raise AdapterError(f"{where} has a malformed shape or offsets")
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        # Exact integers: in int64 a shape such as [2**32, 2**32] wraps to 0 bytes and passes
        # for an empty tensor. numpy refuses any shape whose non-zero dims exceed its byte
        # limit, even with a zero dim, so such a shape is refused here with a message.
        if math.prod(d for d in shape if d) * itemsize > _MAX_BYTES:
            raise AdapterError(f"{where} has an impossible shape {list(shape)}")
        expected = math.prod(shape) * itemsize
        if hi - lo != expected:
            raise AdapterError(f"{where}: {hi - lo} bytes for shape {list(shape)} {dtype}")
        if base + hi > size:
            raise AdapterError(f"{where} lies past the end of the file (truncated download?)")
        return TensorInfo(name, dtype, shape, base + lo, base + hi)

    def _load_bin(self) -> dict[str, TensorInfo]:
        require("torch", "hf")
        import torch

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(
                f"{self.path}: cannot load with weights_only=True ({_one_line(exc)})"
            ) from None
        if not isinstance(state, dict):
            raise AdapterError(f"{self.path}: expected a state dict of tensors")
        self._torch_state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return {
            k: TensorInfo(k, str(v.dtype).removeprefix("torch."), tuple(v.shape), 0, 0)
            for k, v in self._torch_state.items()
        }


def _one_line(exc: Exception) -> str:
    """torch's weights-only refusal spans many lines with ANSI colour codes; keep the reason."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln] or [type(exc).__name__]
    return next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0])


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return np.asarray(t.numpy())
