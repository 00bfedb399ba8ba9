"""What a newcomer sees: trigger evals and savings in monitor and report, the plot's title,
heatmap and overlay, and the report rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.runlog.monitor import monitor
from gradience.runlog.plot import layer_of, plot_run, read_curves
from gradience.runlog.report_html import build_report
from gradience.runlog.triggers import read_triggers
from gradience.telemetry import RunWriter
from tests.factories import AdapterSpec, ModuleSpec, write_adapter
from tests.test_monitor import RUN_START, write_run

GRADIENCE = str(Path(sys.executable).parent / "gradience")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SAVINGS = {"policy": {"min_spacing": 5}, "evals_run": 4, "triggered": 4, "by_reason": {}, "eval_seconds": 8.0,
           "mean_eval_seconds": 2.0, "reference_eval_every": 10, "reference_source": "eval_steps",
           "reference_evals": 10, "evals_saved": 6, "eval_seconds_saved": 12.0}  # fmt: skip
TRIGGERS = {30: ("plateau_entry", "frobenius_norm relative slope 0.0012/step over the last 5 snapshots is below 0.002"),
            55: ("divergence", "sigma_max rate 0.3/step is +7.1 sigma off its last 10 rates (mean 0.01)"),
            80: ("max_spacing", "25 steps since the last eval (max_spacing 25)"), 100: ("final", "last step (100)")}  # fmt: skip


def _trigger_hook(w: RunWriter, s: int) -> None:
    if s in TRIGGERS:
        reason, detail = TRIGGERS[s]
        w.write("metrics", step=s, kind="eval_trigger", reason=reason, detail=detail, detected_step=s - 2,
                also=[], metrics={}, steps_since_eval=10)  # fmt: skip
    if s == 100:
        w.write("run_end", step=s, status="ok", total_steps=s, eval_savings=SAVINGS)


def trigger_run(path: Path) -> Path:
    """A run whose evals a trigger asked for, ending with the savings record."""
    return write_run(path, every=10, hook=_trigger_hook, status=None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("toy")
    modules = {f"bert.encoder.layer.{i}.attention.self.{p}": ModuleSpec(32, 32, [4.0 / (i + 1), 1.0, 0.3])
               for i in range(3) for p in ("query", "value")}  # fmt: skip
    write_adapter(run / "peft", AdapterSpec(modules, r=4, lora_alpha=8))
    (run / "training").mkdir()
    (run / "training" / "training_args.json").write_text(json.dumps(
        {"learning_rate": 2e-4, "max_steps": 100, "per_device_train_batch_size": 16}))  # fmt: skip
    trigger_run(run / "run.jsonl")
    return run


def test_trigger_summary_lists_each_trigger_and_the_savings(run_dir: Path) -> None:
    s = read_triggers(run_dir / "run.jsonl")
    assert s is not None
    assert [(t.step, t.reason, t.detail, t.detected_step) for t in s.triggers] == [
        (step, reason, detail, step - 2) for step, (reason, detail) in TRIGGERS.items()]  # fmt: skip
    assert s.by_reason == {"plateau_entry": 1, "divergence": 1, "max_spacing": 1, "final": 1}
    assert (s.evals_saved, s.reference_evals, s.reference_source, s.fraction_saved) == (6, 10, "eval_steps", 0.6)
    assert s.eval_seconds_saved == 12.0
    assert read_triggers(write_run(run_dir.parent / "plain.jsonl")) is None  # no trigger eval: no section


def test_monitor_text_and_json_show_the_triggers(run_dir: Path) -> None:
    proc = subprocess.run([GRADIENCE, "monitor", str(run_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Trigger eval: 4 triggers" in proc.stdout
    assert "4 evals instead of 10 (every 10 steps: the configured eval_steps): 6 saved (60% of evals)" in proc.stdout
    assert "~12.0 s of eval saved at 2.00 s per eval" in proc.stdout
    assert re.search(r"step +55 +divergence +sigma_max rate 0.3/step .*seen at 53", proc.stdout)
    d = json.loads(subprocess.run([GRADIENCE, "monitor", str(run_dir), "--json"], capture_output=True, text=True,
                                  timeout=120, check=True).stdout)["triggers"]  # fmt: skip
    assert d == monitor(run_dir / "run.jsonl").to_dict()["triggers"]
    assert [t["reason"] for t in d["triggers"]] == ["plateau_entry", "divergence", "max_spacing", "final"]
    assert (d["evals_saved"], d["eval_seconds_saved"], d["fraction_saved"]) == (6, 12.0, 0.6)


def test_plot_has_a_human_title_a_heatmap_and_the_trigger_reasons(run_dir: Path, tmp_path: Path) -> None:
    curves = read_curves(run_dir / "run.jsonl")
    assert curves.title == f"{RUN_START['model']['name']} · {RUN_START['dataset']['name']} · {run_dir.name}"
    assert curves.trigger_reasons == {s: r for s, (r, _) in TRIGGERS.items()}
    assert curves.train_loss is not None and curves.train_eval_loss is not None and curves.eval_split == "test"
    assert curves.heatmap.shape == (len(curves.heatmap_rows), 10)
    result = plot_run(run_dir / "run.jsonl", tmp_path / "p.png")
    assert result.trigger_reasons == {"plateau_entry": 1, "divergence": 1, "max_spacing": 1, "final": 1}
    assert result.heatmap_metric == "frobenius_norm" and result.title == curves.title


def test_heatmap_groups_modules_by_layer(tmp_path: Path) -> None:
    assert layer_of("base_model.model.model.layers.12.self_attn.q_proj") == 12
    assert layer_of("transformer.h.3.attn.c_attn") == 3 and layer_of("lm_head") is None
    log = tmp_path / "run.jsonl"
    with RunWriter(log, run_id="r") as w:
        for s in (10, 20):
            mods = {f"model.layers.{i}.{p}": {"frobenius_norm": float(i + 1) * s} for i in range(2) for p in "qv"}
            w.write("metrics", step=s, kind="structural", reason="interval",
                    metrics={"frobenius_norm": 1.0}, modules=mods)  # fmt: skip
    c = read_curves(log)
    assert c.heatmap_rows == ("layer 0", "layer 1")
    # frobenius_norm of a layer: sqrt of the summed squares of its modules (as the whole adapter's).
    np.testing.assert_allclose(c.heatmap, np.sqrt(2) * np.array([[10.0, 20.0], [20.0, 40.0]]))


def test_plot_overlays_runs(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "seed1" / "run.jsonl"
    other.parent.mkdir()
    write_run(other, every=10, eval_test=(0.7, 0.5))
    out = tmp_path / "both.png"
    proc = subprocess.run([GRADIENCE, "plot", str(run_dir), str(other), "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["paths"] == [str(run_dir / "run.jsonl"), str(other)] and r["title"].endswith(f"{run_dir.name} vs seed1")
    assert r["heatmap_metric"] is None and out.read_bytes()[:4] == b"\x89PNG"


def _report(run_dir: Path, tmp_path: Path) -> tuple[Any, str]:
    result = build_report(run_dir / "run.jsonl", tmp_path / "report.html")
    return result, (tmp_path / "report.html").read_text(encoding="utf-8")


def test_report_runs_the_audit_and_check_beside_the_log(run_dir: Path, tmp_path: Path) -> None:
    result, page = _report(run_dir, tmp_path)
    assert result.sections == ("plots", "monitor", "triggers", "audit", "check", "analysis"), result.unavailable
    assert f"Adapter audit ({run_dir / 'peft'})" in page
    assert "Most rank-hungry modules" in page and "Update energy per layer" in page and "Suggested ranks" in page
    # Layer 0's modules carry 4² of each 4²+1²+0.3² spectrum: the largest energy share, drawn as the full bar.
    shares = [float(x) for x in re.findall(r'class="bar" style="width:([\d.]+)em"', page)]
    assert shares and max(shares) == pytest.approx(12.0)
    assert "Pre-flight check (profile" in page
    assert "Trigger evals: 4" in page and "plateau_entry" in page and "6 saved (60% of evals)" in page
    assert "snake_case" not in page and "uniform_median" not in page  # the audit is tables, not raw pairs


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    _report(run_dir, tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
                    (tmp_path / "report.html").as_uri()], capture_output=True, timeout=180, check=False)  # fmt: skip
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert image.shape == (2400, 1280)
    # A page that rendered: ink in the top band (title and plot), not a blank or error page.
    top = image[:1200]
    assert (top < 128).mean() > 0.01 and top.std() > 20
