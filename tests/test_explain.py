"""`gradience explain` on saved audits, through the console script in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gradience.mechanic.explain import explain
from gradience.mechanic.policies import POLICIES
from tests.factories import PREFIX, AdapterSpec, ModuleSpec, write_adapter

GRADIENCE = str(Path(sys.executable).parent / "gradience")
SIGMAS = {
    "model.layers.0.self_attn.q_proj": [3.0, 1.0, 0.5],
    "model.layers.0.mlp.down_proj": [1.0],
    "model.layers.1.self_attn.q_proj": [2.0, 2.0, 2.0, 2.0],
    "model.layers.1.mlp.down_proj": [1.0, 0.1],
    "model.layers.2.self_attn.q_proj": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
}


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False)


def saved_audit(tmp_path: Path, *extra: str, layers: bool = True) -> Path:
    mods = {n: ModuleSpec(32, 64 if "down_proj" in n else 32, s) for n, s in SIGMAS.items()}
    peft = write_adapter(tmp_path / "peft", AdapterSpec(modules=mods, r=8, lora_alpha=16))
    proc = gradience("audit", "--peft-dir", str(peft), "--json", *(["--layers"] if layers else []), *extra)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "audit.json"
    path.write_text(proc.stdout)
    return path


@pytest.fixture
def audit_json(tmp_path: Path) -> Path:
    return saved_audit(tmp_path)


def test_json_explains_the_suggestion(audit_json: Path) -> None:
    proc = gradience("explain", "--audit", str(audit_json), "--module", "model.layers.0.self_attn.q_proj", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == json.loads(json.dumps(explain(audit_json, "model.layers.0.self_attn.q_proj").to_dict()))
    # σ = 3, 1, 0.5: energies 9, 1, 0.25 of 10.25 -> k@90% = 2, rounded up on 1,2,4,8 -> 2
    assert (got["r"], got["energy_rank"], got["energy_rank_90"], got["suggested_rank"], got["grid_rank"]) == (8, 2, 2, 2, 2)
    assert got["energy_curve"][:3] == pytest.approx([9 / 10.25, 10 / 10.25, 1.0], rel=1e-9)
    assert got["stable_rank"] == pytest.approx(10.25 / 9, rel=1e-6)
    assert got["grid"] == [1, 2, 4, 8]
    policies = {p["policy"]: p["rank"] for p in got["policies"]}
    assert set(policies) == set(POLICIES) and policies["energy"] == 2
    medians = {c["metric"]: c for c in got["compared"]}
    exp_sr = float(np.median([sum(x * x for x in s) / s[0] ** 2 for s in SIGMAS.values()]))
    assert medians["stable_rank"]["median"] == pytest.approx(exp_sr, rel=1e-6)
    assert medians["stable_rank"]["ratio"] == pytest.approx(got["stable_rank"] / exp_sr, rel=1e-9)
    assert medians["energy_rank"]["median"] == 2.0  # k@90% = 2, 1, 4, 1, 8
    assert any("rounds up to 2" in r for r in got["reasons"])


def test_text_output_and_a_unique_tail_of_the_name(audit_json: Path) -> None:
    proc = gradience("explain", "--audit", str(audit_json), "--module", "layers.2.self_attn.q_proj")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for fragment in (
        "GRADIENCE EXPLAIN", "Module: model.layers.2.self_attn.q_proj", "k@90%=8", "<- k@90%",
        "Rank policies:", "optimal_hard_threshold", "Compared with the median of 5 modules:",
        "full allocated rank", "This module needs more than the typical uniform rank",
    ):
        assert fragment in out, fragment
    assert proc.stderr == ""


def test_energy_fraction_of_the_audit_is_used(tmp_path: Path) -> None:
    path = saved_audit(tmp_path, "--energy", "0.8")
    got = json.loads(gradience("explain", "--audit", str(path), "--module", "layers.1.mlp.down_proj", "--json").stdout)
    assert got["energy_fraction"] == 0.8 and got["energy_rank"] == 1
    assert got["policies"][0]["policy"] == "energy@0.8"


def test_zero_update_is_explained(tmp_path: Path) -> None:
    path = saved_audit(tmp_path)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[f"{PREFIX}model.layers.0.mlp.down_proj.lora_B.weight"][:] = 0
    save_file(tensors, str(weights))
    proc = gradience("audit", "--peft-dir", str(tmp_path / "peft"), "--json", "--layers")
    path.write_text(proc.stdout)
    e = explain(path, "model.layers.0.mlp.down_proj")
    assert e.status == "zero" and e.policies == () and "All-zero update" in e.reasons[0]


def test_unknown_module_lists_close_matches(audit_json: Path) -> None:
    proc = gradience("explain", "--audit", str(audit_json), "--module", "model.layers.0.self_atn.q_proj")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no module 'model.layers.0.self_atn.q_proj'")
    assert "close matches: model.layers.0.self_attn.q_proj" in lines[0]
    assert proc.stdout == ""


def test_ambiguous_tail_is_a_usage_error(audit_json: Path) -> None:
    proc = gradience("explain", "--audit", str(audit_json), "--module", "q_proj")
    assert proc.returncode == 2 and "ambiguous" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_audit_files(tmp_path: Path) -> None:
    no_layers = saved_audit(tmp_path, layers=False)
    proc = gradience("explain", "--audit", str(no_layers), "--module", "x")
    assert proc.returncode == 2 and "--json --layers" in proc.stderr
    missing = gradience("explain", "--audit", str(tmp_path / "nope.json"), "--module", "x")
    assert missing.returncode == 2 and "not found" in missing.stderr
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{oops")
    proc = gradience("explain", "--audit", str(garbage), "--module", "x")
    assert proc.returncode == 1 and "invalid JSON" in proc.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"event": "eval"}))
    proc = gradience("explain", "--audit", str(other), "--module", "x")
    assert proc.returncode == 1 and "not a `gradience audit --json` output" in proc.stderr
    for p in (missing, proc):
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
