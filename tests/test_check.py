"""`gradience.preflight.check`: every rule with a config that triggers it and one that does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradience.errors import AdapterError, UnsupportedAdapterError, UsageError
from gradience.preflight.check import HEURISTICS_NOTE, CheckReport, check, format_number
from gradience.preflight.profiles import (
    MODEL_NAMING,
    PROFILES,
    ModelInfo,
    find_profile,
    matches_target,
    module_names,
    resolve_profile,
)

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A clean config per profile: each produces no finding, so any finding below comes from the override.
BASE: dict[str, dict[str, Any]] = {
    "classification": {
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]},
        "training": {"learning_rate": 5e-4, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2,
                     "num_train_epochs": 3.0, "max_steps": -1},
        "model": {"model_type": "bert", "num_hidden_layers": 6},
    },
    "generation": {
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": LLAMA_ALL},
        "training": {"learning_rate": 2e-4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
                     "num_train_epochs": 3.0, "max_steps": 1000},
        "model": {"model_type": "llama", "num_hidden_layers": 4},
    },
}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def make_run(
    tmp_path: Path, profile: str = "classification", lora: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None, model: dict[str, Any] | None = None, with_model: bool = True,
) -> tuple[Path, Path]:
    """Write peft/adapter_config.json, training/training_args.json and (optionally) training/config.json."""
    base = BASE[profile]
    task_type = "SEQ_CLS" if profile == "classification" else "CAUSAL_LM"  # the head each task trains
    lora_cfg = {"peft_type": "LORA", "task_type": task_type, **base["lora"], **(lora or {})}
    write_json(tmp_path / "peft" / "adapter_config.json", lora_cfg)
    write_json(tmp_path / "training" / "training_args.json", {**base["training"], **(training or {})})
    if with_model:
        write_json(tmp_path / "training" / "config.json", {**base["model"], **(model or {})})
    return tmp_path / "peft", tmp_path / "training"


def run_check(tmp_path: Path, task: str = "sst2", profile: str = "classification", **kw: Any) -> CheckReport:
    peft, training = make_run(tmp_path, profile, **kw)
    return check(task, peft, training)


def by_rule(report: CheckReport) -> dict[str, Any]:
    return {f.rule: f for f in report.findings}


# --- baselines ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "profile"), [("sst2", "classification"), ("chat", "generation")])
def test_clean_configs_have_no_findings(tmp_path: Path, task: str, profile: str) -> None:
    report = run_check(tmp_path, task, profile)
    assert report.findings == ()
    assert report.ok
    assert report.profile == profile


def test_report_summarises_inputs(tmp_path: Path) -> None:
    report = run_check(tmp_path)
    assert report.r == 8 and report.lora_alpha == 16 and report.scale == 2.0
    assert report.lora_dropout == 0.1
    assert report.model_type == "bert"
    assert report.model_config == str(tmp_path / "training" / "config.json")
    assert report.training is not None
    assert report.training.effective_batch_size == 32
    assert report.training.total_steps is None
    assert report.note == HEURISTICS_NOTE
    assert any("total steps" in s for s in report.skipped)


# --- rank -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "profile", "r", "rule", "severity"),
    [
        ("sst2", "classification", 2, "rank_too_low", "info"),  # low rank often suffices for labels
        ("sst2", "classification", 64, "rank_too_high", "warning"),
        ("chat", "generation", 4, "rank_too_low", "warning"),
        ("chat", "generation", 128, "rank_too_high", "warning"),
    ],
)
def test_rank_outside_profile(tmp_path: Path, task: str, profile: str, r: int, rule: str, severity: str) -> None:
    report = run_check(tmp_path, task, profile, lora={"r": r, "lora_alpha": 2 * r})
    f = by_rule(report)[rule]
    assert f.severity == severity and f.field == "r" and f.value == r
    assert f.suggested == PROFILES[profile].rank.typical
    assert f.rationale


@pytest.mark.parametrize("r", [4, 16])
def test_rank_at_the_range_edges_is_fine(tmp_path: Path, r: int) -> None:
    report = run_check(tmp_path, lora={"r": r, "lora_alpha": 2 * r})
    assert not [f for f in report.findings if f.rule.startswith("rank")]


def test_rank_pattern_values_are_checked_and_grouped(tmp_path: Path) -> None:
    pattern = {f"layer.{i}.attention.self.query": 64 for i in range(5)}
    report = run_check(tmp_path, lora={"rank_pattern": pattern, "alpha_pattern": {k: 128 for k in pattern}})
    highs = [f for f in report.findings if f.rule == "rank_too_high"]
    assert len(highs) == 1  # five keys with the same rank give one finding
    assert "rank_pattern" in highs[0].field and "2 more" in highs[0].field


def test_rank_zero_in_rank_pattern_is_an_error(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"rank_pattern": {"query": 0}})
    f = by_rule(report)["rank_invalid"]
    assert f.severity == "error" and not report.ok
    assert "rank_invalid" not in by_rule(run_check(tmp_path / "b", lora={"rank_pattern": {"query": 4}}))


# --- effective scale --------------------------------------------------------------------------------


def test_scale_too_large(tmp_path: Path) -> None:
    f = by_rule(run_check(tmp_path, lora={"r": 8, "lora_alpha": 64}))["scale_too_high"]
    assert f.severity == "warning" and f.value == 8.0
    assert f.suggested == 16  # the lora_alpha giving the typical scale 2 at r=8


def test_scale_too_small(tmp_path: Path) -> None:
    f = by_rule(run_check(tmp_path, lora={"r": 16, "lora_alpha": 4}))["scale_too_low"]
    assert f.value == 0.25 and f.field == "lora_alpha"


def test_scale_is_rslora_aware(tmp_path: Path) -> None:
    # r=64, alpha=16: 0.25 with alpha/r (below classification's 0.5), 2 with alpha/sqrt(r)
    plain = run_check(tmp_path / "a", lora={"r": 16, "lora_alpha": 4})
    rs = run_check(tmp_path / "b", lora={"r": 16, "lora_alpha": 4, "use_rslora": True})
    assert "scale_too_low" in by_rule(plain)
    assert "scale_too_low" not in by_rule(rs)
    assert rs.scale == 1.0
    rs_high = run_check(tmp_path / "c", lora={"r": 4, "lora_alpha": 16, "use_rslora": True})
    f = by_rule(rs_high)["scale_too_high"]
    assert f.value == 8.0 and "alpha/sqrt(r)" in f.message and f.suggested == 4.0


def test_pattern_scale_pitfall(tmp_path: Path) -> None:
    # a rank_pattern lowering r with alpha fixed raises that module's scale: 16 / 1 = 16
    report = run_check(tmp_path, lora={"rank_pattern": {"value": 1}})
    f = by_rule(report)["scale_too_high"]
    assert "pattern['value']" in f.field and f.value == 16.0


@pytest.mark.parametrize("alpha", [0, -8])
def test_non_positive_alpha_is_an_error(tmp_path: Path, alpha: float) -> None:
    report = run_check(tmp_path, lora={"lora_alpha": alpha})
    assert by_rule(report)["scale_invalid"].severity == "error"
    assert not report.ok


# --- rsLoRA / DoRA ----------------------------------------------------------------------------------


def test_rslora_and_dora_are_noted(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"use_rslora": True, "use_dora": True, "lora_alpha": 6})
    rules = by_rule(report)
    assert rules["rslora"].severity == "info" and rules["dora"].severity == "info"
    assert report.ok
    plain = by_rule(run_check(tmp_path / "b"))
    assert "rslora" not in plain and "dora" not in plain


def test_high_rank_without_rslora_suggests_it(tmp_path: Path) -> None:
    report = run_check(tmp_path, "chat", "generation", lora={"r": 64, "lora_alpha": 128})
    assert by_rule(report)["rslora_suggested"].suggested is True
    rs = run_check(tmp_path / "b", "chat", "generation", lora={"r": 64, "lora_alpha": 16, "use_rslora": True})
    assert "rslora_suggested" not in by_rule(rs)
    assert "rslora_suggested" not in by_rule(run_check(tmp_path / "c", "chat", "generation"))


# --- dropout ----------------------------------------------------------------------------------------


def test_dropout_too_high(tmp_path: Path) -> None:
    f = by_rule(run_check(tmp_path, lora={"lora_dropout": 0.3}))["dropout_too_high"]
    assert f.severity == "warning" and f.suggested == 0.1
    assert "dropout_too_high" not in by_rule(run_check(tmp_path / "b", lora={"lora_dropout": 0.2}))
    assert "dropout_too_high" not in by_rule(run_check(tmp_path / "c", lora={"lora_dropout": 0.0}))


@pytest.mark.parametrize("dropout", [1.0, -0.1, "0.1"])
def test_dropout_invalid(tmp_path: Path, dropout: Any) -> None:
    report = run_check(tmp_path, lora={"lora_dropout": dropout})
    assert by_rule(report)["dropout_invalid"].severity == "error"


# --- targets ----------------------------------------------------------------------------------------


def test_attention_only_is_flagged_for_generation(tmp_path: Path) -> None:
    report = run_check(tmp_path, "chat", "generation", lora={"target_modules": ["q_proj", "v_proj"]})
    f = by_rule(report)["attention_only"]
    assert f.severity == "warning" and f.suggested == "all-linear"
    assert "attention_only" not in by_rule(run_check(tmp_path / "b", "chat", "generation"))
    all_linear = run_check(tmp_path / "c", "chat", "generation", lora={"target_modules": "all-linear"})
    assert all_linear.findings == ()


def test_attention_only_uses_module_names_without_a_model(tmp_path: Path) -> None:
    report = run_check(tmp_path, "gsm8k", "generation", lora={"target_modules": ["q_proj", "v_proj"]}, with_model=False)
    assert by_rule(report)["attention_only"].severity == "warning"
    assert any("exist in the model" in s for s in report.skipped)


def test_mlp_targets_are_optional_for_classification(tmp_path: Path) -> None:
    # BERT's bare `dense` is the attention output, the MLP output and the pooler at once
    report = run_check(tmp_path, lora={"target_modules": ["query", "value", "dense"]})
    assert by_rule(report)["mlp_targets"].severity == "info"
    assert report.ok
    attn_out = run_check(tmp_path / "b", lora={"target_modules": ["query", "value", "attention.output.dense"]})
    assert "mlp_targets" not in by_rule(attn_out)


def test_targets_partly_missing_is_a_warning(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"target_modules": ["query", "value", "q_proj"]})
    f = by_rule(report)["targets_not_in_model"]
    assert f.severity == "warning" and f.value == ["q_proj"]
    assert "query" in f.suggested and "dense" in f.suggested


def test_targets_all_missing_is_an_error(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"target_modules": ["q_proj", "v_proj"]})  # Llama names on BERT
    f = by_rule(report)["targets_not_in_model"]
    assert f.severity == "error" and not report.ok
    assert "bert" in f.message


def test_regex_targets(tmp_path: Path) -> None:
    ok = run_check(tmp_path / "a", lora={"target_modules": r".*\.attention\.self\.(query|value)"})
    assert ok.findings == ()
    miss = run_check(tmp_path / "b", lora={"target_modules": r".*\.self_attn\.q_proj"})
    assert by_rule(miss)["targets_not_in_model"].severity == "error"
    bad = run_check(tmp_path / "c", lora={"target_modules": "query(("})
    assert by_rule(bad)["target_modules_invalid"].severity == "error"


def test_malformed_target_modules(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"target_modules": 5})
    assert by_rule(report)["target_modules_invalid"].severity == "error"


def test_targets_matching_nothing_are_reported_once(tmp_path: Path) -> None:
    # the pattern key is fine for BERT; only the targets are wrong, so only they are flagged
    report = run_check(tmp_path, lora={"target_modules": ["q_proj"], "rank_pattern": {"query": 4}})
    assert [f.rule for f in report.findings] == ["targets_not_in_model"]


def test_gpt2_and_t5_naming(tmp_path: Path) -> None:
    gpt2 = run_check(tmp_path / "a", "chat", "generation", lora={"target_modules": ["c_attn", "c_proj", "c_fc"]},
                     model={"model_type": "gpt2", "n_layer": 2, "num_hidden_layers": None})
    assert gpt2.findings == ()
    t5 = run_check(tmp_path / "b", "summarization", "generation", lora={"target_modules": ["q", "v"]},
                   model={"model_type": "t5", "num_layers": 2, "num_hidden_layers": None})
    assert [f.rule for f in t5.findings] == ["attention_only"]


def test_unknown_model_type_skips_name_checks(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"target_modules": ["nonexistent"]}, model={"model_type": "mystery"})
    assert "targets_not_in_model" not in by_rule(report)
    assert any("mystery" in s for s in report.skipped)


# --- rank_pattern / alpha_pattern keys ----------------------------------------------------------------


def test_pattern_key_invalid_regex(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"rank_pattern": {"query[": 4}}, with_model=False)
    assert by_rule(report)["pattern_invalid_regex"].severity == "error"


def test_pattern_key_with_saved_prefix(tmp_path: Path) -> None:
    key = "base_model.model.bert.encoder.layer.0.attention.self.query"
    f = by_rule(run_check(tmp_path, lora={"alpha_pattern": {key: 8}}))["pattern_malformed"]
    assert f.severity == "warning" and f.suggested == "bert.encoder.layer.0.attention.self.query"


def test_pattern_key_matching_nothing(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"rank_pattern": {"q_proj": 4, "layer.9.attention.self.query": 4}})
    unmatched = [f for f in report.findings if f.rule == "pattern_unmatched"]
    assert {f.value for f in unmatched} == {"q_proj", "layer.9.attention.self.query"}  # 6 layers: 0..5
    good = {"layer.5.attention.self.query": 4, "bert.encoder.layer.0.attention.self.value": 4, r"layer\.[0-2]\.attention\.self\.query": 4}
    assert run_check(tmp_path / "b", lora={"rank_pattern": good}).findings == ()
    # a key on a module that exists but is not targeted changes nothing either
    key_untargeted = run_check(tmp_path / "c", lora={"rank_pattern": {"intermediate.dense": 4}})
    assert "pattern_unmatched" in by_rule(key_untargeted)


def test_pattern_keys_unchecked_without_model(tmp_path: Path) -> None:
    report = run_check(tmp_path, lora={"rank_pattern": {"q_proj": 4}}, with_model=False)
    assert "pattern_unmatched" not in by_rule(report)
    assert any("rank_pattern" in s for s in report.skipped)


# --- training arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lr", "rule", "severity"),
    [(1e-5, "learning_rate_too_low", "warning"), (5e-3, "learning_rate_too_high", "warning"),
     (2e-2, "learning_rate_absurd", "error"), (0.0, "learning_rate_absurd", "error")],
)
def test_learning_rate(tmp_path: Path, lr: float, rule: str, severity: str) -> None:
    report = run_check(tmp_path, training={"learning_rate": lr})
    f = by_rule(report)[rule]
    assert f.severity == severity and f.field == "learning_rate" and f.suggested == 5e-4
    assert report.ok is (severity != "error")


@pytest.mark.parametrize("lr", [1e-4, 3e-3])
def test_learning_rate_at_the_edges_is_fine(tmp_path: Path, lr: float) -> None:
    assert run_check(tmp_path, training={"learning_rate": lr}).findings == ()


def test_llm_learning_rate_range_differs(tmp_path: Path) -> None:
    assert "learning_rate_too_high" in by_rule(run_check(tmp_path, "chat", "generation", training={"learning_rate": 2e-3}))


def test_steps(tmp_path: Path) -> None:
    few = run_check(tmp_path / "a", training={"max_steps": 50})
    assert by_rule(few)["steps_too_low"].severity == "warning"
    many = run_check(tmp_path / "b", training={"max_steps": 80_000})
    assert by_rule(many)["steps_too_high"].severity == "info"
    assert run_check(tmp_path / "c", training={"max_steps": 500}).findings == ()


def test_steps_from_trainer_state(tmp_path: Path) -> None:
    peft, training = make_run(tmp_path)
    write_json(training / "trainer_state.json", {"max_steps": 40, "global_step": 40})
    report = check("sst2", peft, training)
    assert report.training is not None and report.training.total_steps == 40
    assert "steps_too_low" in by_rule(report)


def test_epochs(tmp_path: Path) -> None:
    assert "epochs_too_high" in by_rule(run_check(tmp_path / "a", training={"num_train_epochs": 50}))
    assert "epochs_too_low" in by_rule(run_check(tmp_path / "b", training={"num_train_epochs": 0.5}))
    assert by_rule(run_check(tmp_path / "c", "chat", "generation", training={"num_train_epochs": 10,
                                                                           "max_steps": -1}))["epochs_too_high"]
    # max_steps > 0 overrides epochs, as in Trainer
    assert run_check(tmp_path / "d", training={"num_train_epochs": 50, "max_steps": 500}).findings == ()


def test_batch_size(tmp_path: Path) -> None:
    small = by_rule(run_check(tmp_path / "a", training={"per_device_train_batch_size": 2,
                                                        "gradient_accumulation_steps": 2}))
    assert small["batch_size_too_low"].severity == "warning" and small["batch_size_too_low"].value == 4
    assert "world size unknown" in small["batch_size_too_low"].message
    large = run_check(tmp_path / "b", training={"per_device_train_batch_size": 64, "gradient_accumulation_steps": 4,
                                                "world_size": 8})
    f = by_rule(large)["batch_size_too_high"]
    assert f.severity == "info" and f.value == 64 * 4 * 8
    # accumulation and world size count: 2 × 2 × 4 = 16 is in range
    fine = run_check(tmp_path / "c", training={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                               "world_size": 4})
    assert fine.findings == ()


def test_missing_training_keys_are_tolerated(tmp_path: Path) -> None:
    peft, training = make_run(tmp_path)
    write_json(training / "training_args.json", {"output_dir": "x", "learning_rate": "fast", "num_train_epochs": 3})
    report = check("sst2", peft, training)
    assert report.ok and report.findings == ()
    assert any("learning rate" in s for s in report.skipped)
    assert any("batch size" in s for s in report.skipped)


def test_training_dir_is_optional_in_the_library(tmp_path: Path) -> None:
    peft, _ = make_run(tmp_path, training={"learning_rate": 1.0})
    report = check("sst2", peft)
    assert report.training is None and report.ok
    assert any("training arguments" in s for s in report.skipped)


# --- inputs and errors -------------------------------------------------------------------------------


def test_unknown_task_lists_profiles(tmp_path: Path) -> None:
    peft, training = make_run(tmp_path)
    with pytest.raises(UsageError) as exc:
        check("weather_forecasting", peft, training)
    for name in PROFILES:
        assert name in str(exc.value)


def test_missing_training_args_names_the_file(tmp_path: Path) -> None:
    peft, _ = make_run(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"training_args\.json"):
        check("sst2", peft, empty)
    (empty / "training_args.bin").write_bytes(b"\x80")
    with pytest.raises(UsageError, match=r"to_dict\(\)"):
        check("sst2", peft, empty)
    with pytest.raises(UsageError, match="not found"):
        check("sst2", peft, tmp_path / "nope")


def test_files_can_be_passed_directly(tmp_path: Path) -> None:
    peft, training = make_run(tmp_path)
    report = check("sst2", peft / "adapter_config.json", training / "training_args.json",
                   model_config=training / "config.json")
    assert report.findings == ()


def test_bad_json_and_bad_adapter(tmp_path: Path) -> None:
    peft, training = make_run(tmp_path)
    (training / "training_args.json").write_text("{not json")
    with pytest.raises(UsageError, match="JSON"):
        check("sst2", peft, training)
    write_json(training / "training_args.json", [1, 2])
    with pytest.raises(UsageError, match="JSON object"):
        check("sst2", peft, training)
    write_json(peft / "adapter_config.json", {"peft_type": "LOHA", "r": 8})
    with pytest.raises(UnsupportedAdapterError):
        check("sst2", peft)
    write_json(peft / "adapter_config.json", {"peft_type": "LORA", "r": 0})
    with pytest.raises(AdapterError):
        check("sst2", peft)
    with pytest.raises(UsageError, match=r"adapter_config\.json"):
        check("sst2", tmp_path / "training")


def test_model_config_option(tmp_path: Path) -> None:
    peft, training = make_run(tmp_path, with_model=False)
    with pytest.raises(UsageError, match="model config not found"):
        check("sst2", peft, training, model_config=tmp_path / "missing.json")
    llama = write_json(tmp_path / "llama" / "config.json", {"model_type": "llama", "num_hidden_layers": 2})
    report = check("sst2", peft, training, model_config=llama.parent)  # a folder works too
    assert report.model_type == "llama"
    assert by_rule(report)["targets_not_in_model"].severity == "error"
    # peft dir is searched as well
    write_json(peft / "config.json", {"model_type": "bert", "num_hidden_layers": 2})
    assert check("sst2", peft, training).model_type == "bert"


def test_to_dict_is_json_with_counts(tmp_path: Path) -> None:
    report = run_check(tmp_path, training={"learning_rate": 0.05, "per_device_train_batch_size": 2})
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["errors"] == 1 and d["warnings"] == 1 and d["ok"] is False
    assert set(d["findings"][0]) == {"rule", "severity", "field", "message", "rationale", "value", "suggested"}
    assert d["findings"][0]["severity"] == "error"  # errors first
    assert d["training"]["effective_batch_size"] == 4


# --- profiles and naming --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "profile"),
    [("sst2", "classification"), ("SST-2", "classification"), ("glue/sst2", "classification"),
     ("imdb", "classification"), ("easy_classification", "classification"), ("gsm8k", "reasoning"),
     ("Math", "reasoning"), ("chat", "generation"), ("code", "generation"), ("summarization", "generation"),
     ("generation", "generation")],
)
def test_aliases(task: str, profile: str) -> None:
    assert resolve_profile(task).name == profile


def test_profiles_are_consistent() -> None:
    assert find_profile("nope") is None
    seen: set[str] = set()
    for p in PROFILES.values():
        for rng in (p.rank, p.scale, p.learning_rate, p.lora_dropout, p.epochs, p.steps, p.batch_size):
            assert rng.low <= rng.high and rng.rationale
            assert rng.typical is None or rng.low <= rng.typical <= rng.high
            assert {rng.below, rng.above} <= {"info", "warning"}
        assert p.learning_rate.high < 1e-2  # the absurd threshold stays above every profile
        assert not seen & set(p.aliases)
        seen |= set(p.aliases)


def test_matches_target_follows_peft() -> None:
    assert matches_target(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert matches_target(["self_attn.q_proj"], "model.layers.0.self_attn.q_proj")
    assert not matches_target(["proj"], "model.layers.0.self_attn.q_proj")
    assert matches_target(r".*q_proj", "model.layers.0.self_attn.q_proj")
    assert not matches_target(r"q_proj", "model.layers.0.self_attn.q_proj")  # a string must fully match


def test_model_info_from_config() -> None:
    info = ModelInfo.from_config("c.json", {"model_type": "gpt2", "n_layer": 3})
    assert info.n_layers == 3 and info.module_types is not None
    assert info.module_types["transformer.h.2.mlp.c_fc"] == "mlp"
    assert ModelInfo.from_config("c.json", {"model_type": "x"}).module_types is None


def test_format_number() -> None:
    assert [format_number(x) for x in (5e-5, 1e-4, 2e-3, 16.0, 0.25, 1 / 3)] == ["5e-5", "1e-4", "0.002", "16", "0.25", "0.3333"]


def _tiny_model_modules(model_type: str) -> set[str]:
    """Linear and embedding module paths of small task models built from a config (random weights)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )
    from transformers.pytorch_utils import Conv1D

    kw: dict[str, Any] = {"vocab_size": 64, "max_position_embeddings": 64, "pad_token_id": 0}
    loaders: list[Any] = [AutoModelForSequenceClassification, AutoModelForCausalLM]
    if model_type == "t5":
        kw.update(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)
        loaders = [AutoModelForSeq2SeqLM]
    elif model_type == "gpt2":
        kw.update(n_embd=16, n_layer=2, n_head=2)
    elif model_type == "distilbert":
        kw.update(dim=16, hidden_dim=32, n_layers=2, n_heads=2)
        loaders = [AutoModelForSequenceClassification]
    else:
        kw.update(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)
    config = AutoConfig.for_model(model_type, **kw)
    names: set[str] = set()
    for loader in loaders:
        model = loader.from_config(config)
        names |= {n for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Linear, Conv1D, torch.nn.Embedding)) and "relative_attention_bias" not in n}
    return names


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "llama", "qwen2", "gpt2", "t5", "phi3"])
def test_naming_table_matches_real_transformers_models(model_type: str) -> None:
    """The table names every linear and embedding module of the real architecture."""
    pytest.importorskip("transformers")
    real = _tiny_model_modules(model_type)
    assert real
    missing = real - set(module_names(MODEL_NAMING[model_type], 2))
    assert not missing, sorted(missing)


def test_check_path_does_not_import_torch() -> None:
    code = ("import sys, gradience.preflight.check, gradience.cli.check, gradience.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_real_peft_and_trainer_snapshots(tmp_path: Path) -> None:
    """Files written by PEFT's save_pretrained and TrainingArguments.to_dict() check cleanly."""
    pytest.importorskip("peft")
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=8, lora_dropout=0.1, use_rslora=True,
                      target_modules=["query", "value"], rank_pattern={"layer.1.attention.self.query": 4})
    get_peft_model(BertForSequenceClassification(config), lora).save_pretrained(tmp_path / "peft")
    (tmp_path / "training").mkdir()
    config.to_json_file(str(tmp_path / "training" / "config.json"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=5e-4, per_device_train_batch_size=16,
                             num_train_epochs=3, report_to="none")
    write_json(tmp_path / "training" / "training_args.json", args.to_dict())
    report = check("sst2", tmp_path / "peft", tmp_path / "training")
    assert report.model_type == "bert"
    assert [f.rule for f in report.findings] == ["rslora"]
