"""Append-only writer for `run.jsonl`, and the sanitiser every record passes through.

A run log outlives the run and gets shared, so what reaches disk is safe by default: only
finite numbers (NaN/Inf become null and are listed under `nonfinite`), no long free text,
no secrets, no absolute paths or host name. Each record is one line written by one
`write` call on an unbuffered file in append mode, so a crash loses at most the last line.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import operator
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, SupportsIndex

from gradience.errors import TelemetryError, UsageError
from gradience.telemetry.reader import read_last_record
from gradience.telemetry.schema import ENVELOPE_FIELDS, EVENTS, SCHEMA, format_path, validate_record

MAX_TEXT_CHARS = 256
_MAX_DEPTH = 64
_SECRET_WORDS = frozenset(
    {
        "password", "passwd", "passwords", "passphrase", "secret", "secrets", "apikey",
        "authorization", "credential", "credentials", "privatekey",
    }
)  # fmt: skip
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key")})
# `token` names a credential only as the key's last word (`hf_token`, `access_token`): as a
# metric's subject (`mean_token_accuracy`, `token_f1`, `num_tokens`) it does not, nor does a
# tokenizer's special token (`pad_token`).
_TOKEN_NOT_SECRET = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "chat", "image"})
_WORD_SPLIT_RE = re.compile(r"[^0-9A-Za-z]+|(?<=[a-z0-9])(?=[A-Z])")
_ABS_PATH_RE = re.compile(r"^(?:/[^\s/]|~/|[A-Za-z]:[\\/]|\\\\)[^\n]*$")
# Where a string stops being one path: whitespace before an option or another path.
_ARG_BOUNDARY_RE = re.compile(r"\s[-/~]")
# An absolute path of two or more components inside longer text; URLs are left alone
# because their slashes follow `:` or `/`, which the look-behind excludes.
_EMBEDDED_PATH_RE = re.compile(r"(?<![\w.~:/\\-])(?:/[^\s/\"'`]+)+/([^\s/\"'`]+)")
# Credential-shaped values, wherever they appear (a command line, a URL, a free-text note):
# Hugging Face, OpenAI/Anthropic, GitHub, AWS and Slack tokens, and HTTP bearer tokens.
_SECRET_VALUE_RE = re.compile(
    r"(?<![A-Za-z0-9])(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abpsr]-[A-Za-z0-9-]{10,})"
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/=-]{8,}"
)
REDACTED = "<redacted>"


@functools.lru_cache(maxsize=4096)  # the same few hundred keys recur in every record
def is_secret_key(key: str) -> bool:
    """True when `key` names a credential (`hf_token`, `apiKey`, `PASSWORD`, ...).

    Whole-word match after splitting on punctuation and camelCase, so metrics such as
    `num_tokens`, `mean_token_accuracy` or `token_f1` are not mistaken for secrets.
    """
    words = [w.lower() for w in _WORD_SPLIT_RE.split(key) if w]
    if any(w in _SECRET_WORDS for w in words):
        return True
    if words and words[-1] == "token" and (len(words) == 1 or words[-2] not in _TOKEN_NOT_SECRET):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def redact_secret_values(text: str) -> str:
    """`text` with every credential-shaped substring (`hf_...`, `sk-...`, `ghp_...`, bearer) redacted.

    Example:
        >>> redact_secret_values("curl -H 'Authorization: Bearer abc.def-123' --token hf_" + "a" * 34)
        "curl -H 'Authorization: Bearer <redacted>' --token <redacted>"
    """
    return _SECRET_VALUE_RE.sub(REDACTED, text)


def _basename(path: str) -> str:
    name = re.split(r"[\\/]", path.rstrip("\\/"))[-1]
    return name or path


class _Sanitizer:
    def __init__(self, allow_raw_text: bool, record_paths: bool, host_names: Iterable[str]):
        self.allow_raw_text = allow_raw_text
        self.record_paths = record_paths
        hosts = sorted({h for h in host_names if len(h) >= 4 and h != "localhost"}, key=len)
        # Not `\b`: `_` is a word character, and transformers' old default run name is
        # `runs/Nov23_12-00-00_<hostname>`.
        self.host_re = (
            re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(h) for h in reversed(hosts)) + r")(?![A-Za-z0-9])")
            if hosts and not record_paths
            else None
        )
        self.nonfinite: list[str] = []

    def text(self, value: str) -> str:
        if len(value) > MAX_TEXT_CHARS and not self.allow_raw_text:
            return f"<redacted: {len(value)} chars>"
        value = redact_secret_values(value)
        if not self.record_paths:
            # A whole string that is one path becomes its last component; paths inside a
            # longer string (a command line) are shortened in place, so it keeps its shape.
            if _ABS_PATH_RE.match(value) and not _ARG_BOUNDARY_RE.search(value):
                return _basename(value)
            value = _EMBEDDED_PATH_RE.sub(r"\1", value)
        if self.host_re is not None:
            value = self.host_re.sub("<host>", value)
        return value

    def value(self, value: Any, path: list[str | int]) -> Any:
        if value is None or type(value) in (bool, int):
            return value
        if isinstance(value, str):
            return self.text(str(value))
        if isinstance(value, int):  # IntEnum and friends
            return int(value)
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            self.nonfinite.append(format_path(path))
            return None
        if len(path) > _MAX_DEPTH:
            return "<redacted: nested too deep>"
        if isinstance(value, Mapping):
            return self.mapping(value, path)
        if isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
            return [self.value(v, [*path, i]) for i, v in enumerate(items)]
        module = type(value).__module__.split(".")[0]
        if module in ("numpy", "torch", "jax") and hasattr(value, "tolist"):
            return self.value(value.tolist(), path)  # arrays -> lists, scalars -> Python
        if isinstance(value, (bytes, bytearray)):
            return f"<redacted: {len(value)} bytes>"
        if hasattr(value, "__float__") and not isinstance(value, os.PathLike):
            try:
                return self.value(float(value), path)  # Decimal, Fraction, ...
            except (TypeError, ValueError):
                pass
        return self.text(os.fspath(value) if isinstance(value, os.PathLike) else str(value))

    def mapping(self, value: Mapping[Any, Any], path: list[str | int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in value.items():
            key = key if isinstance(key, str) else str(key)
            if item is not None and is_secret_key(key):
                out[self.text(key)] = REDACTED
            else:  # keys are text too: a path or a token used as a key is redacted like a value
                clean = self.text(key)
                out[clean] = self.value(item, [*path, clean])
        return out


def sanitize(
    record: Mapping[Any, Any],
    allow_raw_text: bool = False,
    *,
    record_paths: bool = False,
    host_names: Iterable[str] = (),
) -> dict[str, Any]:
    """Return a JSON-safe copy of `record` fit to share; `record` itself is not changed.

    Why: a run log must load in any JSON parser and must not leak secrets or private paths.
    Rules: NaN/Inf (also inside numpy scalars and arrays) become null and their paths, in
    `format_path` notation (`metrics.loss`, `modules["layer.0.q"].sigma_max`), are listed
    under `nonfinite`; numpy values become Python values; strings over 256 characters become
    `"<redacted: N chars>"` unless `allow_raw_text`; values under credential-like keys become
    `"<redacted>"` always; unless `record_paths`, an absolute path becomes its last component
    (relative paths are kept) and `host_names` become `<host>`.

    Example:
        >>> sanitize({"metrics": {"loss": float("nan")}, "api_key": "sk-1"})
        {'metrics': {'loss': None}, 'api_key': '<redacted>', 'nonfinite': ['metrics.loss']}
    """
    worker = _Sanitizer(allow_raw_text, record_paths, host_names)
    out = worker.mapping(record, [])
    if worker.nonfinite:
        out["nonfinite"] = worker.nonfinite
    return out


def local_host_names() -> list[str]:
    name = socket.gethostname()
    return [name, name.split(".")[0]] if name else []


def _check_event_args(
    event: str, step: SupportsIndex | None, fields: Mapping[str, Any]
) -> int | None:
    if event not in EVENTS:
        raise UsageError(f"unknown telemetry event {event!r}; use one of {', '.join(EVENTS)}")
    clash = sorted(set(fields) & set(ENVELOPE_FIELDS))
    if clash:
        raise UsageError(f"field(s) {', '.join(clash)} are set by the writer; rename them")
    if step is None:
        return None
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise UsageError(f"`step` must be an integer or None, got {step!r}")
    return operator.index(step)


def _encode(record: dict[str, Any]) -> bytes:
    problems = validate_record(record)
    if problems:
        raise UsageError(f"invalid `{record['event']}` record: " + "; ".join(problems))
    return (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")


class RunWriter:
    """Write one run's records to a JSON Lines file, one flushed line per record.

    Why a class: it owns the run id and the `seq` counter, which must stay strictly
    increasing across the whole file, including after a resume.

    Args:
        path: the log file (created with its parent folders if missing).
        run_id: the run's id; default a new random one, or on resume the id in the file.
        resume: continue an existing, non-empty log after its last valid `seq`. Without it
            an existing non-empty log is a `UsageError`, so runs are never mixed by accident.
        allow_raw_text: keep strings over 256 characters.
        record_paths: keep absolute paths and the host name.
        clock: source of `ts` (unix seconds); injectable for tests.

    Example:
        >>> with RunWriter("runs/toy/run.jsonl") as log:  # doctest: +SKIP
        ...     log.write("train_step", step=1, loss=0.7)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        run_id: str | None = None,
        resume: bool = False,
        allow_raw_text: bool = False,
        record_paths: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.allow_raw_text = allow_raw_text
        self.record_paths = record_paths
        self._clock = clock
        self._hosts = [] if record_paths else local_host_names()
        self._lock = threading.Lock()
        self.seq = 0
        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()):
            raise UsageError(f"`run_id` must be a non-empty string, got {run_id!r}")
        size = self.path.stat().st_size if self.path.is_file() else 0
        torn = False
        if size > 0:
            if not resume:
                raise UsageError(
                    f"{self.path} already holds a run log; pass resume=True to continue it "
                    "or choose a new path"
                )
            last = read_last_record(self.path)
            if last is not None:
                self.seq = last.seq + 1
                run_id = run_id or last.run_id
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
        self.run_id: str = run_id or uuid.uuid4().hex[:16]
        # Unbuffered: each record reaches the OS in one write, so readers see whole lines.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: Any = open(self.path, "ab", buffering=0)  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot open run log {self.path}: {exc.strerror}") from exc
        if torn:  # end a torn line so the next record starts on a line of its own
            self._fh.write(b"\n")

    def write(self, event: str, step: SupportsIndex | None = None, **fields: Any) -> dict[str, Any]:
        """Append one record and return it exactly as written (envelope included).

        Raises:
            UsageError: unknown event, missing required field, or a reserved field name.
            TelemetryError: the writer is closed or the disk write failed.
        """
        step = _check_event_args(event, step, fields)
        clean = sanitize(
            fields,
            self.allow_raw_text,
            record_paths=self.record_paths,
            host_names=self._hosts,
        )
        with self._lock:
            if self._fh is None:
                raise TelemetryError(f"{self.path}: write after close")
            record = {"schema": SCHEMA, "ts": float(self._clock()), "run_id": self.run_id}
            record.update(seq=self.seq, event=event, step=step, **clean)
            line = _encode(record)
            try:
                view = memoryview(line)
                while view:  # a regular file takes it all at once; loop for the odd short write
                    view = view[self._fh.write(view) :]
            except OSError as exc:
                raise TelemetryError(f"{self.path}: cannot write record: {exc}") from exc
            self.seq += 1
        return record

    def close(self) -> None:
        """Close the file; further writes raise. Safe to call twice."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    @property
    def closed(self) -> bool:
        return self._fh is None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def append_record_atomic(
    path: str | os.PathLike[str], event: str, step: SupportsIndex | None = None, **fields: Any
) -> dict[str, Any]:
    """Add one record to a finished log without ever leaving it half-written.

    Why: tools such as `gradience audit --append run.jsonl` write after the run. The log is
    copied to a temp file beside it, the record is appended and fsynced, and the copy
    replaces the original, so existing bytes are unchanged and a crash leaves either the
    old or the new file. The envelope continues the last valid record's `run_id` and `seq`.
    Do not use it on a log a live `RunWriter` still has open (its later lines would be lost).

    Raises:
        UsageError: the log does not exist, or the record is invalid.
        TelemetryError: the log holds no valid record, or the write failed.
    """
    target = Path(path)
    if not target.is_file():
        raise UsageError(f"run log not found: {target} (run the training with telemetry first)")
    step = _check_event_args(event, step, fields)
    last = read_last_record(target)
    if last is None:
        raise TelemetryError(f"{target}: no valid record to continue; is it a Gradience run log?")
    clean = sanitize(fields, host_names=local_host_names())
    record: dict[str, Any] = {"schema": SCHEMA, "ts": time.time(), "run_id": last.run_id}
    record.update(seq=last.seq + 1, event=event, step=step, **clean)
    line = _encode(record)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(target, "rb") as src:
            shutil.copyfileobj(src, out)
            if out.tell() > 0:
                src.seek(-1, os.SEEK_END)
                if src.read(1) != b"\n":
                    out.write(b"\n")  # keep a torn last line on its own line
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise TelemetryError(f"{target}: cannot append record: {exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return record


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
