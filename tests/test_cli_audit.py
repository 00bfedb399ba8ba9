"""`gradience audit` through the installed console script, in real subprocesses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gradience.mechanic.audit import HYPOTHESIS_NOTE, audit
from tests.cli_helpers import assert_one_error_line as _assert_one_error_line
from tests.factories import PREFIX, AdapterSpec, ModuleSpec, expected_metrics, write_adapter

GRADIENCE = str(Path(sys.executable).parent / "gradience")
MODULE_KEYS = {"name", "frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90", "utilization"}
SIGMAS = {
    "model.layers.0.self_attn.q_proj": [3.0, 1.0, 0.5],
    "model.layers.0.mlp.down_proj": [1.0],
    "model.layers.1.self_attn.q_proj": [2.0, 2.0, 2.0, 2.0],
    "model.layers.1.mlp.down_proj": [1.0, 0.1],
}


def _spec() -> AdapterSpec:
    mods = {
        name: ModuleSpec(32, 64 if "down_proj" in name else 32, sig) for name, sig in SIGMAS.items()
    }
    return AdapterSpec(modules=mods, r=8, lora_alpha=16)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "peft", _spec(), dtype=np.float32)


def gradience(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRADIENCE, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def _strict_json(text: str) -> Any:
    def reject(token: str) -> None:
        raise AssertionError(f"non-finite number {token} in --json output")

    return json.loads(text, parse_constant=reject)




def test_console_script_is_installed() -> None:
    assert Path(GRADIENCE).is_file()
    proc = gradience("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("gradience ")


# --- output ---------------------------------------------------------------------------------


def test_text_output_has_the_summary_and_layers(adapter_dir: Path) -> None:
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--layers")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    for line in (
        "GRADIENCE LoRA AUDIT", "Stable rank (mean)", "Energy rank k@90% (p50/p90)",
        "Least rank-used", "Suggested ranks", HYPOTHESIS_NOTE, f"PEFT dir: {adapter_dir}",
        "Modules: 4  Layers: 2",
    ):
        assert line in out, line
    report = audit(str(adapter_dir))
    assert f"Stable rank (mean): {report.summary.stable_rank_mean:.2f}" in out
    assert f"r={report.suggestion.uniform_p90}" in out
    assert "Warnings:" not in out and "Problems:" not in out
    table = out.split("\nModules:\n", 1)[1]  # the per-module table of --layers
    for name in SIGMAS:
        assert f"  {name}  " in table


def test_energy_flag_adds_named_fields_and_p50_p90_keep_meaning_90(adapter_dir: Path, tmp_path: Path) -> None:
    """Case 5: `energy_rank_p50/p90` are always the 90% rank; `--energy 0.8` adds `energy_rank_80_*`."""
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--energy", "0.8")
    assert proc.returncode == 0, proc.stderr
    assert "Energy rank k@90% (p50/p90)" in proc.stdout and "energy_rank_80_p50:" in proc.stdout
    at80, at90 = audit(str(adapter_dir), energy=0.8), audit(str(adapter_dir))
    assert (at80.summary.energy_rank_p50, at80.summary.energy_rank_p90) == (
        at90.summary.energy_rank_p50, at90.summary.energy_rank_p90)
    k80 = [m.energy_rank for m in at80.modules]
    assert at80.summary.other_energy == {
        "energy_rank_80_p50": float(np.percentile(k80, 50)), "energy_rank_80_p90": float(np.percentile(k80, 90))}
    log = tmp_path / "run.jsonl"
    log.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS))
    assert gradience("audit", "--peft-dir", str(adapter_dir), "--energy", "0.8", "--append", str(log)).returncode == 0
    metrics = json.loads(log.read_text().splitlines()[-1])["metrics"]
    assert metrics["energy_rank_p90"] == at90.summary.energy_rank_p90
    assert metrics["energy_rank_80_p90"] == at80.summary.other_energy["energy_rank_80_p90"]


def test_json_equals_the_python_api_exactly(adapter_dir: Path) -> None:
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    got = _strict_json(proc.stdout)
    expected = json.loads(json.dumps(audit(str(adapter_dir)).to_dict(include_modules=False)))
    assert got == expected
    assert "modules" not in got
    assert got["summary"]["n_modules"] == 4


def test_json_with_energy_and_top_wasteful_equals_the_api(adapter_dir: Path) -> None:
    proc = gradience(
        "audit", "--peft-dir", str(adapter_dir), "--json", "--energy", "0.8", "--top-wasteful", "2"
    )
    assert proc.returncode == 0, proc.stderr
    report = audit(str(adapter_dir), energy=0.8, top_wasteful=2)
    assert _strict_json(proc.stdout) == json.loads(json.dumps(report.to_dict(include_modules=False)))
    assert len(report.wasteful) == 2


def test_json_layers_has_module_rows_with_the_metrics(adapter_dir: Path) -> None:
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--json", "--layers")
    assert proc.returncode == 0, proc.stderr
    got = _strict_json(proc.stdout)
    assert got == json.loads(json.dumps(audit(str(adapter_dir)).to_dict(include_modules=True)))
    rows = {row["name"]: row for row in got["modules"]}
    assert set(rows) == set(SIGMAS)
    spec = _spec()
    for name, row in rows.items():
        assert set(row) >= MODULE_KEYS
        m = spec.modules[name]
        exp = expected_metrics(m.sigma, 8, (m.out_features, m.in_features))
        for key in MODULE_KEYS - {"name"}:
            assert row[key] == pytest.approx(exp[key], rel=1e-5), (name, key)  # float32 weights


def test_two_runs_give_identical_json(adapter_dir: Path) -> None:
    args = ("audit", "--peft-dir", str(adapter_dir), "--json", "--layers")
    first, second = gradience(*args), gradience(*args)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert first.stdout.strip()


# --- bad input ------------------------------------------------------------------------------


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    proc = gradience("audit", "--peft-dir", str(missing))
    assert proc.returncode == 2
    _assert_one_error_line(proc, str(missing))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    proc = gradience("--debug", "audit", "--peft-dir", str(missing))
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "UsageError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_corrupt_safetensors_is_a_data_error(adapter_dir: Path) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # the header cut short
    proc = gradience("audit", "--peft-dir", str(adapter_dir))
    assert proc.returncode == 1
    _assert_one_error_line(proc, str(weights))


def test_garbage_safetensors_is_a_data_error(adapter_dir: Path) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(b"<html>404 Not Found</html>")  # a failed download
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--json")
    assert proc.returncode == 1
    _assert_one_error_line(proc, str(weights))


def test_invalid_adapter_config_is_a_data_error(adapter_dir: Path) -> None:
    config = adapter_dir / "adapter_config.json"
    config.write_text('{"peft_type": "LORA", "r": 8,')
    proc = gradience("audit", "--peft-dir", str(adapter_dir))
    assert proc.returncode == 1
    _assert_one_error_line(proc, str(config), "invalid JSON")


def test_non_lora_adapter_is_refused(adapter_dir: Path) -> None:
    config = adapter_dir / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LOKR", "r": 8}))
    proc = gradience("audit", "--peft-dir", str(adapter_dir))
    assert proc.returncode == 2
    _assert_one_error_line(proc, "LOKR", "LoRA")


def test_energy_out_of_range_is_a_usage_error(adapter_dir: Path) -> None:
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--energy", "1.5")
    assert proc.returncode == 2
    _assert_one_error_line(proc, "--energy", "1.5")


def test_argparse_errors_exit_2(adapter_dir: Path) -> None:
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--energy", "lots")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_lora_A_without_lora_B_prints_the_report_and_exits_1(adapter_dir: Path) -> None:
    """Case 7: a module that cannot be read fails the run (CI must not pass it); the report still prints."""
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    broken = "model.layers.1.mlp.down_proj"
    del tensors[f"{PREFIX}{broken}.lora_B.weight"]
    save_file(tensors, str(weights))
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--json", "--layers")
    assert proc.returncode == 1, proc.stderr
    got = _strict_json(proc.stdout)
    assert [p["module"] for p in got["problems"]] == [broken]
    assert "lora_A" in got["problems"][0]["problem"] and "lora_B" in got["problems"][0]["problem"]
    assert got["summary"]["n_modules"] == 3
    assert {row["name"] for row in got["modules"]} == set(SIGMAS) - {broken}
    assert any("could not be read" in w for w in got["warnings"])
    text = gradience("audit", "--peft-dir", str(adapter_dir))
    assert text.returncode == 1
    assert "Problems:" in text.stdout and broken in text.stdout.split("Problems:", 1)[1]


def test_nan_weights_are_reported_and_the_rest_is_audited(adapter_dir: Path) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    bad = "model.layers.0.mlp.down_proj"
    tensors[f"{PREFIX}{bad}.lora_A.weight"][0, 0] = np.nan
    save_file(tensors, str(weights))
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--json", "--layers")
    assert proc.returncode == 0, proc.stderr
    got = _strict_json(proc.stdout)
    rows = {row["name"]: row for row in got["modules"]}
    assert rows[bad]["status"] == "nonfinite"
    assert all(rows[bad][k] is None for k in MODULE_KEYS - {"name"})
    assert all(rows[n]["status"] == "ok" for n in SIGMAS if n != bad)
    assert any("NaN" in w and bad in w for w in got["warnings"])
    assert got["problems"] == []
    # aggregates leave the NaN module out
    good = [rows[n]["stable_rank"] for n in SIGMAS if n != bad]
    assert got["summary"]["stable_rank_mean"] == pytest.approx(float(np.mean(good)), rel=1e-12)
    text = gradience("audit", "--peft-dir", str(adapter_dir), "--layers")
    assert text.returncode == 0
    assert "status=nonfinite" in text.stdout


# --- --append -------------------------------------------------------------------------------

RECORDS = [
    {"schema": "gradience.run/1", "ts": 1.0, "run_id": "r1", "seq": 0, "event": "run_start",
     "step": 0, "config": {"r": 8}},
    {"schema": "gradience.run/1", "ts": 2.0, "run_id": "r1", "seq": 1, "event": "train_step",
     "step": 1, "loss": 0.7},
]


@pytest.mark.skipif(
    importlib.util.find_spec("gradience.telemetry") is None,
    reason="gradience.telemetry (append_record_atomic) is not written yet",
)
def test_append_adds_one_lora_audit_record_and_keeps_the_log(adapter_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    original = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)
    log.write_bytes(original)
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--append", str(log), "--json")
    assert proc.returncode == 0, proc.stderr
    data = log.read_bytes()
    assert data.startswith(original)  # the existing lines, byte for byte
    lines = data.decode().splitlines()
    assert len(lines) == 3
    record = _strict_json(lines[-1])
    assert record["schema"] == "gradience.run/1"
    assert (record["event"], record["kind"], record["seq"], record["run_id"]) == (
        "metrics", "lora_audit", 2, "r1",
    )
    report = audit(str(adapter_dir))
    assert record["metrics"]["n_modules"] == 4
    assert record["metrics"]["stable_rank_mean"] == pytest.approx(report.summary.stable_rank_mean)
    assert record["suggestion"]["uniform_p90"] == report.suggestion.uniform_p90
    # the report itself is still printed
    assert _strict_json(proc.stdout)["summary"]["n_modules"] == 4


@pytest.mark.skipif(
    importlib.util.find_spec("gradience.telemetry") is None,
    reason="gradience.telemetry (append_record_atomic) is not written yet",
)
def test_append_to_a_missing_log_is_a_usage_error(adapter_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "missing.jsonl"
    proc = gradience("audit", "--peft-dir", str(adapter_dir), "--append", str(log))
    assert proc.returncode == 2
    _assert_one_error_line(proc, str(log))
    assert not log.exists()


def test_a_command_imports_only_its_own_module(tmp_path: Path) -> None:
    # `gradience audit` must start fast: no torch, and not the other commands' libraries.
    spec = AdapterSpec(modules={"m.layers.0.q_proj": ModuleSpec(16, 16, [1.0])}, r=4)
    peft_dir = write_adapter(tmp_path / "peft", spec)
    code = (
        "import sys, io, contextlib\n"
        "from gradience.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()): rc = main(['audit', '--peft-dir', {str(peft_dir)!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'scipy', 'gradience.analysis', 'gradience.cli.analyze') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"
