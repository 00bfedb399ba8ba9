"""One test per row of `gradience.cli._errors.TABLE`: the message line and the exit code.

Where the condition is easy to make for real (a path under a file, a missing adapter, a
non-finite number on its way to JSON) the test makes it; where it is not (a full disk, a
permission error as root) the command's library call raises the OS error it would raise.
"""

from __future__ import annotations

import argparse
import errno
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gradience.cli.audit as audit_cli
import gradience.cli.compress as compress_cli
from gradience.cli import main
from gradience.cli._errors import TABLE, lookup
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

ROWS_TESTED: set[str] = set()


def _spec() -> AdapterSpec:
    return AdapterSpec({"model.layers.0.mlp.down_proj": ModuleSpec(16, 12, [3.0, 1.0, 0.5])}, r=4, lora_alpha=8)


def _run(capsys: pytest.CaptureFixture[str], row: str, *argv: str) -> tuple[int, str, str]:
    ROWS_TESTED.add(row)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def run(args: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setattr(audit_cli, "run", run)


def _one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_interrupt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _raising(monkeypatch, KeyboardInterrupt())
    code, _, err = _run(capsys, "interrupt", "audit", "--peft-dir", "x")
    assert code == 130 and err.strip() == "Interrupted."


def test_broken_pipe_is_quiet(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _raising(monkeypatch, BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert _run(capsys, "broken_pipe", "audit", "--peft-dir", "x") == (0, "", "")


def test_gradience_error_keeps_its_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "gradience", "audit", "--peft-dir", str(tmp_path / "missing"))
    assert code == 2 and out == ""
    _one_line(err, "Error: ", "missing: adapter not found")


def test_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = write_adapter(tmp_path / "a", _spec())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "not_a_directory", "compress", "--peft-dir", str(adapter),
                        "--out-dir", str(blocker / "out"), "--rank", "2")  # fmt: skip
    assert code == 1
    _one_line(err, "Error: ", "not a directory")


def test_is_a_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        open(tmp_path, "rb")  # noqa: SIM115 - the real error, raised by the OS
    except IsADirectoryError as exc:
        _raising(monkeypatch, exc)
    code, _, err = _run(capsys, "is_a_directory", "audit", "--peft-dir", "x")
    assert code == 1
    _one_line(err, "Error: ", str(tmp_path), "is a directory")


def test_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        open(tmp_path / "gone", "rb")  # noqa: SIM115
    except FileNotFoundError as exc:
        _raising(monkeypatch, exc)
    code, _, err = _run(capsys, "not_found", "audit", "--peft-dir", "x")
    assert code == 1
    _one_line(err, "Error: ", "gone", "no such file")


def test_permission(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _raising(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/srv/adapter"))
    code, _, err = _run(capsys, "permission", "audit", "--peft-dir", "x")
    assert code == 1
    _one_line(err, "Error: /srv/adapter: permission denied")


def test_disk_full_while_writing_leaves_no_half_adapter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gradience.lora.writer as writer

    adapter = write_adapter(tmp_path / "a", _spec())

    def full(path: Path, tensors: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer, "write_safetensors", full)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "disk_full", "compress", "--peft-dir", str(adapter), "--out-dir", str(out), "--rank", "2")
    assert code == 1
    _one_line(err, "Error: ", "no space left on device")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp folder left


def test_read_only(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _raising(monkeypatch, OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run.jsonl"))
    code, _, err = _run(capsys, "read_only", "audit", "--peft-dir", "x")
    assert code == 1
    _one_line(err, "Error: /mnt/ro/run.jsonl: read-only file system")


def test_other_os_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _raising(monkeypatch, OSError(errno.EIO, "Input/output error", "/dev/sdz"))
    code, _, err = _run(capsys, "os", "audit", "--peft-dir", "x")
    assert code == 1
    _one_line(err, "Error: /dev/sdz: Input/output error")


def test_non_finite_value_on_its_way_to_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Report:
        problems = ()

        def to_dict(self, include_modules: bool = False) -> dict[str, Any]:
            return {"summary": {"frobenius_norm_total": float("nan")}}

    monkeypatch.setattr(audit_cli, "audit", lambda *a, **k: Report())
    (tmp_path / "adapter_config.json").write_text("{}")  # resolves as an adapter folder
    code, out, err = _run(capsys, "non_finite_json", "audit", str(tmp_path), "--json")
    assert code == 1 and out == ""
    _one_line(err, "Error: ", "NaN or Inf")


def test_out_of_memory(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(compress_cli, "run", lambda args: (_ for _ in ()).throw(MemoryError()))
    code, _, err = _run(capsys, "out_of_memory", "compress", "--peft-dir", "x", "--out-dir", "y", "--rank", "1")
    assert code == 1
    _one_line(err, "Error: out of memory")


def test_a_bug_keeps_its_traceback() -> None:
    assert lookup(ZeroDivisionError()) is None


def test_every_row_has_a_test() -> None:
    """Runs last in this file (pytest keeps file order): each row was exercised above."""
    assert {row.name for row in TABLE} == ROWS_TESTED


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path: Path, where: str) -> None:
    rest = ["audit", "--peft-dir", str(tmp_path / "missing")]
    argv = ["--debug", *rest] if where == "before" else [*rest, "--debug"]
    cmd = [sys.executable, "-c", "from gradience.cli import entry; entry()", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("Error: ")
