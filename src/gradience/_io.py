"""Small file helpers every writer shares: atomic replacement and strict JSON in and out.

A user's file is never left half-written: data goes to a temp file beside the target, is
fsynced, then renamed over it, so a reader sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from gradience.errors import UsageError


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle on a temp file beside `path`, fsynced and moved onto it on success.

    On an exception the temp file is removed and `path` is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part."""
    with atomic_open(path) as fh:
        fh.write(data)


def json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become None, unknown objects their `str`."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_json(path: Path, payload: Any, *, indent: int = 2) -> None:
    """`payload` as strict, sorted JSON at `path`, written atomically."""
    text = json.dumps(json_safe(payload), indent=indent, sort_keys=True) + "\n"
    replace_atomic(path, text.encode("utf-8"))


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a one-line `UsageError` saying why it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data
