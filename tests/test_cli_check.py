"""`gradience check` through the installed console script, in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradience.preflight.check import HEURISTICS_NOTE, check
from gradience.preflight.profiles import find_profile
from tests.cli_helpers import assert_one_error_line as _one_error_line

GRADIENCE = str(Path(sys.executable).parent / "gradience")

ADAPTER = {
    "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
    "target_modules": ["query", "key", "value", "attention.output.dense"], "use_rslora": False,
    "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
}
# What `TrainingArguments(...).to_dict()` writes, trimmed to the keys the check reads plus a few others.
TRAINING = {
    "output_dir": "runs/toy/training", "per_device_train_batch_size": 16, "num_train_epochs": 3.0,
    "max_steps": 120, "learning_rate": 2e-3, "lr_scheduler_type": "linear", "warmup_steps": 10,
    "weight_decay": 0.0, "gradient_accumulation_steps": 1, "report_to": [], "hub_token": "<HUB_TOKEN>",
}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_json(tmp_path / "peft" / "adapter_config.json", ADAPTER)
    write_json(tmp_path / "training" / "training_args.json", TRAINING)
    return tmp_path


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False)


def check_args(run_dir: Path, task: str = "sst2", *extra: str) -> list[str]:
    config = run_dir / "peft" / "adapter_config.json"
    profile = find_profile(task)
    if config.is_file() and profile is not None and profile.name != "classification":
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("task_type") == "SEQ_CLS":  # a generative task trains a causal LM
            write_json(config, {**data, "task_type": "CAUSAL_LM"})
    return ["check", "--task", task, "--peft-dir", str(run_dir / "peft"),
            "--training-dir", str(run_dir / "training"), *extra]




def test_golden_path_passes(run_dir: Path) -> None:
    proc = gradience(*check_args(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout.splitlines()
    assert out[0] == "=" * 72 and out[1] == "GRADIENCE CHECK" and out[2] == "=" * 72
    text = proc.stdout
    for fragment in (
        "Task: sst2 (profile: classification)",
        f"Adapter config: {run_dir / 'peft' / 'adapter_config.json'}",
        f"Training args: {run_dir / 'training' / 'training_args.json'}",
        "Model config: none found",
        "LoRA: r=8 alpha=16 scale alpha/r=2 dropout=0.05 rsLoRA=no DoRA=no",
        "Targets: query, key, value, attention.output.dense",
        "Training: lr=0.002 effective batch=16 epochs=3 max_steps=120 total steps=120",
        "Skipped:",
        "Verdict: 0 errors, 0 warnings",
    ):
        assert fragment in text
    assert out[-1] == HEURISTICS_NOTE


def test_warnings_are_grouped_and_exit_zero(run_dir: Path) -> None:
    proc = gradience(*check_args(run_dir, "gsm8k"))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Warnings (3):" in text and "Errors" not in text
    for rule in ("[attention_only]", "[learning_rate_too_high]", "[steps_too_low]"):
        assert rule in text
    assert "      why: " in text and "      suggested: learning_rate = 2e-4" in text
    assert "Verdict: 0 errors, 3 warnings (review the warnings before training)" in text


def test_errors_exit_one(run_dir: Path) -> None:
    write_json(run_dir / "training" / "training_args.json", {**TRAINING, "learning_rate": 0.05})
    write_json(run_dir / "training" / "config.json", {"model_type": "llama", "num_hidden_layers": 2})
    proc = gradience(*check_args(run_dir))
    assert proc.returncode == 1
    assert proc.stderr == ""
    text = proc.stdout
    assert "Errors (2):" in text
    assert "Warnings" not in text
    assert "[learning_rate_absurd]" in text and "[targets_not_in_model]" in text
    assert "Model config: " in text and "(model_type llama)" in text
    assert "Verdict: 2 errors, 0 warnings (fix the errors before training)" in text


def test_json_equals_the_python_api(run_dir: Path) -> None:
    write_json(run_dir / "model" / "config.json", {"model_type": "bert", "num_hidden_layers": 6})
    model = str(run_dir / "model" / "config.json")
    proc = gradience(*check_args(run_dir, "chat", "--model-config", model, "--json"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    api = check("chat", run_dir / "peft", run_dir / "training", model_config=model).to_dict()
    assert data == json.loads(json.dumps(api))
    assert data["profile"] == "generation" and data["model_type"] == "bert"
    assert data["errors"] == 0 and data["ok"] is True
    assert data["warnings"] == sum(f["severity"] == "warning" for f in data["findings"]) >= 1


def test_json_exit_code_follows_errors(run_dir: Path) -> None:
    write_json(run_dir / "peft" / "adapter_config.json", {**ADAPTER, "lora_dropout": 1.0})
    proc = gradience(*check_args(run_dir, "sst2", "--json"))
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["ok"] is False and data["findings"][0]["rule"] == "dropout_invalid"


def test_unknown_task_is_a_usage_error(run_dir: Path) -> None:
    proc = gradience(*check_args(run_dir, "astrology"))
    assert proc.returncode == 2
    _one_error_line(proc, "unknown task 'astrology'", "classification", "reasoning", "generation")


def test_missing_training_args_is_a_usage_error(run_dir: Path) -> None:
    (run_dir / "training" / "training_args.json").unlink()
    proc = gradience(*check_args(run_dir))
    assert proc.returncode == 2
    _one_error_line(proc, "training_args.json")


def test_missing_peft_dir_is_a_usage_error(run_dir: Path) -> None:
    proc = gradience("check", "--task", "sst2", "--peft-dir", str(run_dir / "nope"),
                     "--training-dir", str(run_dir / "training"))
    assert proc.returncode == 2
    _one_error_line(proc, "nope")


def test_missing_model_config_is_a_usage_error(run_dir: Path) -> None:
    proc = gradience(*check_args(run_dir, "sst2", "--model-config", str(run_dir / "missing.json")))
    assert proc.returncode == 2
    _one_error_line(proc, "model config not found")


def test_required_flags(run_dir: Path) -> None:
    proc = gradience("check", "--peft-dir", str(run_dir / "peft"), "--training-dir", str(run_dir / "training"))
    assert proc.returncode == 2
    assert "--task" in proc.stderr


def test_non_lora_adapter_is_refused(run_dir: Path) -> None:
    write_json(run_dir / "peft" / "adapter_config.json", {"peft_type": "IA3"})
    proc = gradience(*check_args(run_dir))
    assert proc.returncode == 2
    _one_error_line(proc, "IA3")


def test_debug_shows_the_traceback(run_dir: Path) -> None:
    proc = gradience("--debug", *check_args(run_dir, "astrology"))
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_help_lists_profiles() -> None:
    proc = gradience("check", "--help")
    assert proc.returncode == 0
    for name in ("classification", "reasoning", "generation", "--model-config", "--json"):
        assert name in proc.stdout


# -- issue 10: check before training, from a training config ---------------------------------------

TRL_YAML = """\
# trl sft --config train.yaml
model_name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct
use_peft: true
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
lora_task_type: CAUSAL_LM
learning_rate: 2.0e-4
per_device_train_batch_size: 8
gradient_accumulation_steps: 4
max_steps: 600
lr_scheduler_type: cosine
warmup_ratio: 0.03
hub_token: hf_secretsecretsecretsecretsecret12
"""

AXOLOTL_YAML = """\
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
adapter: lora
lora_r: 64
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 3
learning_rate: 0.02
lr_scheduler: cosine
"""


def test_check_reads_a_trl_yaml_before_training(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(TRL_YAML, encoding="utf-8")
    proc = gradience("check", "--task", "gsm8k", "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert (report["r"], report["lora_alpha"], report["scale"]) == (16, 32, 2.0)
    assert report["adapter_config"] == str(config) and report["training"]["path"] == str(config)
    t = report["training"]
    assert (t["learning_rate"], t["effective_batch_size"], t["total_steps"]) == (2e-4, 32, 600)
    assert report["errors"] == 0 and "task_model_mismatch" not in [f["rule"] for f in report["findings"]]


def test_check_reads_an_axolotl_yaml_and_its_names(tmp_path: Path) -> None:
    config = tmp_path / "axolotl.yml"
    config.write_text(AXOLOTL_YAML, encoding="utf-8")
    proc = gradience("check", "--task", "gsm8k", "--config", str(config))
    assert proc.returncode == 1  # learning_rate 0.02 is an error
    out = proc.stdout
    assert "LoRA: r=64 alpha=16 scale alpha/r=0.25" in out and "Targets: all-linear" in out
    assert "Training: lr=0.02 effective batch=8 epochs=3" in out
    assert "[learning_rate_absurd]" in out and "[rslora_suggested]" in out


def test_check_json_config_and_usage_errors(tmp_path: Path) -> None:
    config = write_json(tmp_path / "train.json", {"lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-4,
                                                  "per_device_train_batch_size": 16, "max_steps": 300})  # fmt: skip
    proc = gradience("check", "--task", "sst2", "--config", str(config), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["r"] == 8
    no_lora = write_json(tmp_path / "plain.json", {"learning_rate": 1e-4})
    _one_error_line(gradience("check", "--task", "sst2", "--config", str(no_lora)), "no LoRA settings", "--peft-dir")
    _one_error_line(gradience("check", "--task", "sst2"), "adapter folder", "--config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: [1, 2\n", encoding="utf-8")
    _one_error_line(gradience("check", "--task", "sst2", "--config", str(bad)), "invalid YAML")


def test_a_classification_head_with_a_chat_task_is_flagged(run_dir: Path) -> None:
    model = write_json(run_dir / "model" / "config.json", {"model_type": "bert", "num_hidden_layers": 6,
                                                           "architectures": ["BertForSequenceClassification"]})
    write_json(run_dir / "peft" / "adapter_config.json", {**ADAPTER, "task_type": None})
    proc = gradience(*check_args(run_dir, "chat", "--model-config", str(model), "--json"))
    assert proc.returncode == 1
    mismatch = [f for f in json.loads(proc.stdout)["findings"] if f["rule"] == "task_model_mismatch"]
    assert len(mismatch) == 1 and mismatch[0]["severity"] == "error"
    assert "BertForSequenceClassification" in mismatch[0]["message"] and mismatch[0]["suggested"] == "CAUSAL_LM"
    write_json(run_dir / "peft" / "adapter_config.json", {**ADAPTER, "task_type": "SEQ_CLS"})
    proc = gradience("check", "--task", "chat", "--peft-dir", str(run_dir / "peft"), "--json")
    assert [f["rule"] for f in json.loads(proc.stdout)["findings"]].count("task_model_mismatch") == 1
