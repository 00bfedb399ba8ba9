"""Crash safety: a run killed with SIGKILL keeps every record written before the kill.

A real training process (tiny Trainer + callback, a snapshot every step, a pause per step)
is killed mid-run; the log must read back strictly, a torn last line must be reported and
skipped, and `gradience monitor` must call the run incomplete. `audit --append` must leave
the log untouched when the final rename fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from gradience import cli
from gradience.errors import TelemetryError
from gradience.telemetry import ReadProblems, RunWriter, iter_records
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

ROOT = Path(__file__).resolve().parents[1]
GRADIENCE = Path(sys.executable).parent / "gradience"
MIN_RECORDS = 25
START_TIMEOUT_S = 120


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """(log path, complete lines seen just before the kill) of a run killed by SIGKILL."""
    out = tmp_path_factory.mktemp("crash")
    log = out / "log" / "run.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tests.tiny_trainer", "slow", str(out), "0.02"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _count_lines(log) < MIN_RECORDS:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"training exited early with {proc.returncode}:\n{err[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {MIN_RECORDS} records after {START_TIMEOUT_S}s")
            time.sleep(0.05)
        seen = _count_lines(log)
        proc.send_signal(signal.SIGKILL)  # mid-run: no on_train_end, no run_end, no flush hook
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return log, seen


def test_every_record_flushed_before_the_kill_reads_back_strictly(killed_run: tuple[Path, int]) -> None:
    log, seen = killed_run
    raw = log.read_bytes()
    assert raw.endswith(b"\n")  # one write per record: a kill never leaves half a line
    records = list(iter_records(log, strict=True))
    assert len(records) >= seen >= MIN_RECORDS
    assert [r.seq for r in records] == list(range(len(records)))
    assert len({r.run_id for r in records}) == 1
    events = {r.event for r in records}
    assert {"run_start", "train_step", "metrics"} <= events and "run_end" not in events
    steps = [r.step for r in records if r.event == "metrics"]
    assert steps == list(range(1, len(steps) + 1))  # a snapshot every step, none lost


def test_a_torn_last_line_is_reported_with_its_number_and_skipped(
    killed_run: tuple[Path, int], tmp_path: Path
) -> None:
    log = tmp_path / "run.jsonl"
    log.write_bytes(killed_run[0].read_bytes() + b'{"schema":"gradience.run/1","ts":17954')
    n_complete = killed_run[0].read_bytes().count(b"\n")
    problems = ReadProblems()
    records = list(iter_records(log, problems=problems))
    assert len(records) == n_complete
    assert problems.lines == [n_complete + 1]
    assert "torn last line" in problems.messages()[0] and f"line {n_complete + 1}" in problems.messages()[0]
    with pytest.raises(TelemetryError, match=f":{n_complete + 1}: torn last line"):
        list(iter_records(log, strict=True))


def test_monitor_calls_the_killed_run_incomplete(killed_run: tuple[Path, int], tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    log.write_bytes(killed_run[0].read_bytes() + b'{"seq": 9')
    done = subprocess.run([str(GRADIENCE), "monitor", str(log), "--json"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["status"] == "incomplete" and "no run_end" in report["status_note"]
    assert any("run_end" in m for m in report["missing"])
    assert report["skipped_lines"] == 1 and "torn last line" in report["read_problems"][0]
    text = subprocess.run([str(GRADIENCE), "monitor", str(log)], capture_output=True, timeout=120)
    assert text.returncode == 0 and b"run_end" in text.stdout


# -- audit --append: all or nothing ----------------------------------------------------------


@pytest.fixture
def adapter_and_log(tmp_path: Path) -> tuple[Path, Path]:
    peft_dir = write_adapter(tmp_path / "peft", AdapterSpec({"layers.0.q_proj": ModuleSpec(32, 24, [3.0, 1.0])}, r=4))
    log = tmp_path / "run" / "run.jsonl"
    with RunWriter(log) as w:
        w.write("run_start", 0)
        w.write("train_step", 1, loss=0.5)
    return peft_dir, log


def test_audit_append_when_the_rename_fails_leaves_the_log_byte_identical(
    adapter_and_log: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    peft_dir, log = adapter_and_log
    before = log.read_bytes()

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    code = cli.main(["audit", "--peft-dir", str(peft_dir), "--append", str(log)])
    assert code == 1
    assert "cannot append record" in capsys.readouterr().err
    assert log.read_bytes() == before
    assert sorted(p.name for p in log.parent.iterdir()) == ["run.jsonl"]  # no temp file left


def test_audit_append_adds_exactly_one_record_after_the_old_bytes(adapter_and_log: tuple[Path, Path]) -> None:
    peft_dir, log = adapter_and_log
    before = log.read_bytes()
    assert cli.main(["audit", "--peft-dir", str(peft_dir), "--append", str(log), "--json"]) == 0
    after = log.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    last = list(iter_records(log, strict=True))[-1]
    assert (last.event, last.data["kind"], last.seq) == ("metrics", "lora_audit", 2)
    assert sorted(p.name for p in log.parent.iterdir()) == ["run.jsonl"]
