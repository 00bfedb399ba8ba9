"""`gradience monitor` through the installed console script, in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradience.runlog.monitor import monitor
from gradience.telemetry import RunWriter, append_record_atomic
from tests.cli_helpers import assert_one_error_line as _assert_one_error_line
from tests.test_monitor import write_run

GRADIENCE = str(Path(sys.executable).parent / "gradience")


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _strict_json(text: str) -> Any:
    def reject(token: str) -> None:
        raise AssertionError(f"non-finite number {token} in --json output")

    return json.loads(text, parse_constant=reject)




@pytest.fixture
def healthy(tmp_path: Path) -> Path:
    return write_run(tmp_path / "runs" / "toy" / "run.jsonl")


def test_text_output_matches_the_reference_layout(healthy: Path) -> None:
    proc = gradience("monitor", str(healthy))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["=" * 72, "GRADIENCE MONITOR", "=" * 72]
    assert lines[3] == f"File: {healthy}"
    for expected in (
        "Model: tiny-bert (22.7M params, 300.0K trainable)",
        "Dataset: rotten_tomatoes (train 800, test 200)",
        "Profile: easy_classification",
        "Status: ok (run_end at step 100)",
        "Latest eval signals:",
        "  Train PPL: 1.42",
        "  Test PPL: 1.57",
        "  Gap: 1.11x",
        "  Train Acc: 85.0%",
        "Diagnostics:",
        "  Stable rank (mean): 4",
        "  Utilization (mean): 50.0%",
        "Recommendations (hypotheses to verify on held-out data, not predictions):",
        "Alerts: none",
    ):
        assert expected in lines, expected
    # No label count logged: no chance level is guessed (issue 10, finding 3).
    assert "  Test Acc: 80.0%" in lines and not any("(chance" in line for line in lines)
    assert any(line.startswith("  none fired (rules: gap > 1.5x;") for line in lines)
    # The default view leaves the verbose blocks out.
    assert "LoRA config:" not in proc.stdout and "Structural trend" not in proc.stdout


def test_verbose_adds_config_trends_alerts_and_audit(tmp_path: Path) -> None:
    def hook(w: RunWriter, s: int) -> None:
        if s in (10, 20, 30, 40):
            w.write("alert", step=s, severity="warning", code="loss_spike", message=f"spike at {s}")

    log = write_run(tmp_path / "run.jsonl", hook=hook)
    append_record_atomic(log, "metrics", kind="lora_audit", peft_dir="peft",
                         metrics={"utilization_mean": 0.184, "stable_rank_mean": 1.47},
                         suggestion={"uniform_median": 4, "uniform_p90": 8})  # fmt: skip
    plain = gradience("monitor", str(log)).stdout
    assert "  step 10:" not in plain and "  step 40: [warning] loss_spike: spike at 40" in plain
    proc = gradience("monitor", str(log), "--verbose")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in (
        "LoRA config:", "  r: 8", "  lora_alpha: 16", "  target_modules: ['query', 'value']",
        "Training args:", "  learning_rate: 0.0002",
        "  eval_policy: fixed  structural_interval: 20",
        "Structural trend (last 5 snapshots; slope per 100 steps; flat when |relative change| < 5%):",
        "Alerts: 4 (loss_spike: 4)", "  step 10: [warning] loss_spike: spike at 10",
        "Audit (appended; adapter peft):", "  uniform_p90: 8",
        "Latest eval per split:",
    ):  # fmt: skip
        assert expected in out.splitlines(), expected
    assert any(line.startswith("  utilization") and line.endswith("flat") for line in out.splitlines())


def test_json_is_the_report_dict(healthy: Path) -> None:
    proc = gradience("monitor", str(healthy), "--json")
    assert proc.returncode == 0, proc.stderr
    got = _strict_json(proc.stdout)
    assert got == json.loads(json.dumps(monitor(str(healthy)).to_dict()))
    assert got["status"] == "ok" and got["signals"]["test_split"] == "test"


def test_overfitting_run_recommends_with_its_rule(tmp_path: Path) -> None:
    log = write_run(tmp_path / "run.jsonl", eval_train=(0.5, 0.05), eval_test=(0.6, 1.0),
                    utilization=(0.1, 0.1), energy_rank=1.5)  # fmt: skip
    proc = gradience("monitor", str(log))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "  Gap: 2.59x" in out
    assert "  - [memorizing] Gap 2.59x > 1.5x: probably memorizing" in out
    assert "      rule: gap = test ppl / train ppl > 1.5x; value: 2.586" in out
    assert ("  - [rank_overprovisioned] 90% of the update's energy sits in 1.5 of r=8 directions (mean "
            "energy_rank_90, latest structural snapshot): r=2 is the hypothesis to test") in out
    assert "      rule: mean energy_rank_90 / r < 25%; value: 0.1875" in out
    data = _strict_json(gradience("monitor", str(log), "--json").stdout)
    assert [r["code"] for r in data["recommendations"]] == ["memorizing", "rank_overprovisioned"]


def test_partial_and_damaged_logs_say_what_is_missing(tmp_path: Path) -> None:
    log = write_run(tmp_path / "run.jsonl", train=False, structural=False, status=None)
    with open(log, "ab") as fh:
        fh.write(b"not json\n")
    proc = gradience("monitor", str(log))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Status: incomplete (no run_end record: still running or crashed" in out
    assert "Steps: 100 (no train_step records)" in out
    assert "Missing from this log:" in out and "  - train_step: no training loss (an eval-only log?)" in out
    assert "  No structural metrics in this log." in out
    n_lines = len(log.read_bytes().splitlines())
    assert "Log problems (1 line skipped):" in out
    assert f"  - line {n_lines}: malformed JSON (Expecting value); skipped" in out


def test_missing_file_is_exit_2(tmp_path: Path) -> None:
    proc = gradience("monitor", str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 2
    _assert_one_error_line(proc, "run log not found", "nope.jsonl")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "empty"), (b"garbage\n{\"a\": 1}\n", "no valid record")],
)
def test_empty_or_invalid_log_is_exit_1(tmp_path: Path, content: bytes, fragment: str) -> None:
    log = tmp_path / "run.jsonl"
    log.write_bytes(content)
    for extra in ((), ("--json",)):
        proc = gradience("monitor", str(log), *extra)
        assert proc.returncode == 1
        _assert_one_error_line(proc, fragment)


def test_help_lists_monitor() -> None:
    proc = gradience("--help")
    assert proc.returncode == 0 and "monitor" in proc.stdout
    proc = gradience("monitor", "--help")
    assert proc.returncode == 0 and "--verbose" in proc.stdout and "--json" in proc.stdout


def test_monitor_path_does_not_import_torch(healthy: Path) -> None:
    code = (
        "import sys; from gradience.cli import main; "
        f"rc = main(['monitor', {str(healthy)!r}, '--json']); "
        "assert rc == 0 and 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_causal_lm_run_is_labelled_as_logged(tmp_path: Path) -> None:
    # Issue 10, findings 3 and 6: a causal LM's exact match judged against "chance 50%",
    # "Acc: n/a" lines, split "eval" printed as "Test", a local model folder losing its hub id.
    log = tmp_path / "run.jsonl"
    with RunWriter(log, run_id="lm") as w:
        w.write("run_start", step=0, model={"name": "smollm2-135m-instruct", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                task={"kind": "causal_lm", "peft_task_type": "CAUSAL_LM", "model_class": "LlamaForCausalLM"},
                lora={"r": 16})  # fmt: skip
        for s in range(1, 11):
            w.write("train_step", step=s, loss=2.0 - 0.1 * s, entropy=1.5, mean_token_accuracy=0.5 + 0.01 * s)
        w.write("eval", step=10, split="eval", metrics={"loss": 0.9, "exact_match": 0.45, "mean_token_accuracy": 0.7})
        w.write("run_end", step=10, status="ok")
    lines = gradience("monitor", str(log)).stdout.splitlines()
    assert "Model: smollm2-135m-instruct (HuggingFaceTB/SmolLM2-135M-Instruct)" in lines
    assert "Task: causal_lm, peft_task_type CAUSAL_LM, model_class LlamaForCausalLM" in lines
    signals = lines[lines.index("Latest eval signals:"):lines.index("Diagnostics:")]
    for expected in ("  Eval loss: 0.9000", "  Eval PPL (per token): 2.46", "  Eval exact match: 45.0%",
                     "  Eval token accuracy: 70.0%", "  Train loss: 1 (falling: -10 per 100 steps, -47.4% over "
                     "the last 10 logs)", "  Train (latest): entropy=1.5, mean_token_accuracy=0.6"):  # fmt: skip
        assert expected in signals, (expected, signals)
    assert not any(word in line for line in signals for word in ("chance", "Test", "Acc:"))
