"""`demo_evaluator` and `gradience compress --verify` on a real (tiny) demo run."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from gradience.cli import main
from gradience.demo import DemoConfig, DemoResult, evaluate_adapter, train_demo
from gradience.demo.evaluator import DemoEvaluator, demo_evaluator
from gradience.errors import MissingDependencyError, UsageError
from tests.test_demo import TINY, needs_training


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    # one eval at the end only: the fixture pattern of test_demo, without its periodic evals
    return train_demo(tmp_path_factory.mktemp("toy"), DemoConfig(**{**TINY, "eval_steps": TINY["max_steps"]}))


def _copy_with_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@needs_training
def test_cli_verify_prints_accuracy_before_and_after(
    tiny_run: DemoResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    args = ["compress", "--peft-dir", str(tiny_run.peft_dir), "--out-dir", str(out), "--rank", "2", "--verify"]
    assert main(args) == 0  # in process: a subprocess would import torch a second time
    text = capsys.readouterr().out
    assert "Verify: demo task test split" in text
    assert re.search(r"accuracy\s+\d\.\d{4}\s+\d\.\d{4}\s+[+-]\d\.\d{4}", text), text
    assert main([*args, "--json", "--force"]) == 0
    v = json.loads(capsys.readouterr().out)["verify"]
    assert "n_test=32" in v["evaluator"] and "demo_config.json" in v["evaluator"]  # the run's own split
    assert set(v["before"]) == {"accuracy", "loss"}
    assert v["before"]["accuracy"] == pytest.approx(tiny_run.test_accuracy)
    assert v["before"]["loss"] == pytest.approx(tiny_run.test_loss, abs=1e-4)
    after = evaluate_adapter(out, n_test=32, seed=0)  # the compressed adapter, scored directly
    assert v["after"] == pytest.approx({"accuracy": after["accuracy"], "loss": after["loss"]}, abs=1e-6)
    assert v["delta"]["loss"] == pytest.approx(v["after"]["loss"] - v["before"]["loss"])


@needs_training
def test_evaluator_reads_the_split_beside_the_adapter_or_uses_defaults(tiny_run: DemoResult, tmp_path: Path) -> None:
    fn = demo_evaluator(tiny_run.peft_dir)
    assert (fn.n_test, fn.seed, fn.max_length) == (32, 0, 64)
    lone = shutil.copytree(tiny_run.peft_dir, tmp_path / "lone" / "peft")
    assert demo_evaluator(lone) == DemoEvaluator()  # no training/demo_config.json: defaults, said so
    assert "DemoConfig defaults" in DemoEvaluator().description


@needs_training
@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, "base model is meta-llama"),
        ({"task_type": "CAUSAL_LM"}, "task_type is CAUSAL_LM"),
    ],
)
def test_evaluator_refuses_adapters_of_another_task(
    tiny_run: DemoResult, tmp_path: Path, changes: dict[str, str], problem: str
) -> None:
    d = _copy_with_config(tiny_run.peft_dir, tmp_path / "other", **changes)
    with pytest.raises(UsageError, match=rf"--verify scores the demo task .*{problem}.*verify=fn"):
        demo_evaluator(d)


def test_evaluator_names_the_hf_extra_when_it_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install gradience\[hf\]"):
        demo_evaluator(tmp_path)
