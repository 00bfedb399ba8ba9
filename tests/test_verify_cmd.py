"""`compress --verify-cmd`: the user's own eval, run on the original and the compressed adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradience.errors import GradienceError, UsageError
from gradience.mechanic.compress import compress
from gradience.mechanic.verify_cmd import CommandEvaluator, parse_metrics
from tests.cli_helpers import assert_one_error_line
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

GRADIENCE = str(Path(sys.executable).parent / "gradience")

# An eval that reads the adapter it is given: the energy |s·B·A|_F² of its update (s = alpha / r,
# r from the saved factor), so the compressed adapter (rank 1 of a rank-3 spectrum) scores lower.
EVAL = """
import json, sys
import numpy as np
from safetensors.numpy import load_file
t = load_file(sys.argv[1] + "/adapter_model.safetensors")
alpha = json.load(open(sys.argv[1] + "/adapter_config.json"))["lora_alpha"]
total = sum(float(np.linalg.norm(alpha / t[k].shape[0] * t[k.replace("lora_A", "lora_B")] @ t[k]) ** 2)
            for k in t if "lora_A" in k)
print("loading... done")
print(json.dumps({"update_energy": total, "split": "test", "flag": True}))
"""


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    spec = AdapterSpec({"layers.0.q_proj": ModuleSpec(16, 12, [3.0, 1.0, 0.5])}, r=4, lora_alpha=4)
    return write_adapter(tmp_path / "peft", spec)


@pytest.fixture
def eval_script(tmp_path: Path) -> Path:
    path = tmp_path / "my_eval.py"
    path.write_text(EVAL)
    return path


def test_parse_metrics_takes_the_numbers_of_the_last_json_line() -> None:
    out = 'step 1\n{"eval_loss": 0.5}\nnoise {not json\n{"eval_loss": 0.41, "split": "test", "ok": true}\n'
    assert parse_metrics(out) == {"eval_loss": 0.41}
    with pytest.raises(GradienceError, match="no JSON object"):
        parse_metrics("loss 0.41\n")
    with pytest.raises(GradienceError, match="no finite number"):
        parse_metrics('{"split": "test", "loss": NaN}')


def test_template_needs_the_placeholder() -> None:
    with pytest.raises(UsageError, match=r"needs \{adapter\}"):
        CommandEvaluator("python eval.py")
    with pytest.raises(UsageError, match="does not parse"):
        CommandEvaluator("python 'eval.py {adapter}")
    assert CommandEvaluator("python e.py --adapter={adapter}").argv("/a b") == ["python", "e.py", "--adapter=/a b"]


def test_compress_reports_the_pair_from_the_users_command(adapter: Path, eval_script: Path, tmp_path: Path) -> None:
    verify = CommandEvaluator(f"{sys.executable} {eval_script} {{adapter}}")
    report = compress(adapter, tmp_path / "small", rank=1, verify=verify)
    v = report.verify
    assert v is not None and v.evaluator == f"command: {verify.template}"
    # Closed form: energy 3² + 1² + 0.5² before, 3² after keeping the top direction.
    assert v.before["update_energy"] == pytest.approx(10.25, rel=1e-6)
    assert v.after["update_energy"] == pytest.approx(9.0, rel=1e-4)
    assert v.delta["update_energy"] == pytest.approx(-1.25, rel=1e-3)


def test_cli_verify_cmd(adapter: Path, eval_script: Path, tmp_path: Path) -> None:
    cmd = f"{sys.executable} {eval_script} {{adapter}}"
    proc = subprocess.run([GRADIENCE, "compress", str(adapter), "--out-dir", str(tmp_path / "s"), "--rank", "1",
                           "--verify-cmd", cmd, "--json"], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    verify = json.loads(proc.stdout)["verify"]
    assert set(verify["before"]) == set(verify["after"]) == {"update_energy"}
    proc = subprocess.run([GRADIENCE, "compress", str(adapter), "--out-dir", str(tmp_path / "t"), "--rank", "1",
                           "--verify-cmd", f"{sys.executable} -c 'import sys; sys.exit(3)' {{adapter}}"],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 1
    assert_one_error_line(proc, "--verify-cmd on", "exited 3")
    assert not (tmp_path / "t").exists()  # the original is scored before anything is written
