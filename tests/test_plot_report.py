"""`gradience plot` and `gradience report` (library and console script, real subprocesses)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradience.errors import MissingDependencyError
from gradience.runlog.monitor import monitor
from gradience.runlog.plot import png_size, read_curves
from gradience.telemetry import RunWriter
from tests.cli_helpers import assert_one_error_line as _one_error_line
from tests.test_monitor import write_run

GRADIENCE = str(Path(sys.executable).parent / "gradience")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AUDIT = {"utilization_mean": 0.31, "stable_rank_mean": 2.48}


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=300, check=False)




def _triggers(w: RunWriter, s: int) -> None:
    if s in (37, 60):  # a trigger between evals (eval at 40) and one at an eval step
        w.write("metrics", step=s, kind="eval_trigger", metrics={"score": 1.0})
    if s == 100:
        w.write("metrics", step=s, kind="lora_audit", peft_dir="peft", metrics=AUDIT,
                suggestion={"uniform_median": 4, "uniform_p90": 8})  # fmt: skip


@pytest.fixture
def run_log(tmp_path: Path) -> Path:
    return write_run(tmp_path / "runs" / "toy" / "run.jsonl", every=10, hook=_triggers)


def test_triggers_mark_the_eval_they_cause(run_log: Path) -> None:
    curves = read_curves(run_log)
    assert curves.eval_split == "test"
    assert curves.trigger_steps.tolist() == [37, 60]
    assert curves.triggered_eval_steps.tolist() == [40, 60]
    assert len(curves.eval_loss or []) == 10 and len(curves.structural["sigma_max"]) == 10


def test_an_eval_record_with_reason_trigger_is_a_trigger(tmp_path: Path) -> None:
    def hook(w: RunWriter, s: int) -> None:
        if s == 25:
            w.write("eval", step=s, split="test", reason="trigger", metrics={"loss": 0.5})

    curves = read_curves(write_run(tmp_path / "run.jsonl", every=10, hook=hook))
    assert curves.trigger_steps.tolist() == [25]
    assert curves.triggered_eval_steps.tolist() == [25]


def test_plot_cli_writes_a_png(run_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots" / "run.png"  # the folder does not exist yet
    proc = gradience("plot", str(run_log), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) == result["bytes"] > 10_000
    width, height = png_size(data)
    assert (width, height) == (result["width_px"], result["height_px"])
    assert 600 <= width <= 2000 and 600 <= height <= 3000
    assert result["metrics"] == ["frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90"]
    assert (result["n_evals"], result["n_triggers"], result["n_triggered_evals"]) == (10, 2, 2)
    assert not list(out.parent.glob(".*.tmp"))  # the temp file was renamed away


def test_report_cli_is_one_offline_html_file(run_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    proc = gradience("report", str(run_log), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Wrote {out} (") and "plots, monitor, triggers, audit, analysis" in proc.stdout
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(srcs[0].split(",", 1)[1])[:8] == PNG_MAGIC
    report = monitor(run_log)
    assert report.signals.test_ppl is not None and report.signals.gap is not None
    for number in (f"{report.signals.test_ppl:.2f}", f"{report.signals.gap:.2f}x", "85.0%", "50.0%"):
        assert f">{number}<" in page, number
    assert "Audit (appended at step 100; adapter peft)" in page and ">0.310<" in page
    assert "Analysis: structure vs eval loss" in page and "10 of 10 eval steps" in page


def test_report_without_eval_leaves_the_analysis_out(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    with RunWriter(log, run_id="r") as w:
        for s in (10, 20, 30):
            w.write("metrics", step=s, kind="structural", reason="interval",
                    metrics={"frobenius_norm": s / 10, "sigma_max": s / 20})  # fmt: skip
    proc = gradience("report", str(log), "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("note: analysis left out: ") and "no eval records" in proc.stderr
    assert "Not available: " in (tmp_path / "r.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", ["plot", "report"])
def test_bad_input_is_one_line(command: str, tmp_path: Path) -> None:
    proc = gradience(command, str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2
    _one_error_line(proc, "not found", "missing.jsonl")
    bare = write_run(tmp_path / "bare.jsonl", structural=False)
    proc = gradience(command, str(bare), "-o", str(tmp_path / "out.bin"))
    assert proc.returncode == 1
    _one_error_line(proc, "no structural records", "bare.jsonl")
    assert not (tmp_path / "out.bin").exists()


def test_missing_matplotlib_is_one_line(run_log: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None; from gradience.cli import main; "
            f"sys.exit(main(['plot', {str(run_log)!r}]))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 2
    _one_error_line(proc, "pip install gradience[plot]")


def test_the_core_does_not_import_matplotlib(run_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("import sys, gradience, gradience.runlog.plot, gradience.runlog.report_html, gradience.cli; "
            "gradience.cli.build_parser(); print('matplotlib' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.stdout.strip() == "False", proc.stderr
    from gradience.runlog.plot import plot_run

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"gradience\[plot\]"):
        plot_run(run_log)


def test_png_size_rejects_other_bytes() -> None:
    with pytest.raises(ValueError):
        png_size(b"GIF89a" + bytes(30))
    assert png_size(PNG_MAGIC + b"\x00\x00\x00\rIHDR" + np.array([7, 5], ">u4").tobytes()) == (7, 5)
