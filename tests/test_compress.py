"""`compress` against PEFT itself and against closed-form errors on known spectra."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from gradience.errors import UnsupportedAdapterError, UsageError
from gradience.lora.reader import Adapter, pattern_key
from gradience.lora.safetensors_file import TensorFile
from gradience.lora.writer import exact_pattern_keys, write_safetensors
from gradience.mechanic.audit import audit
from gradience.mechanic.compress import budget_ranks, compress
from tests.factories import AdapterSpec, ModuleSpec, write_adapter

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel  # noqa: E402

from tests.test_adapter import _lora_layers, _save_peft, _tiny_gpt2, _tiny_llama  # noqa: E402

GRADIENCE = str(Path(sys.executable).parent / "gradience")
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
DOWN0 = "model.layers.0.mlp.down_proj"


def _load_peft(directory: Path, base: Any = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base if base is not None else _tiny_llama(), directory)


def _deltas(peft_model: Any) -> dict[str, np.ndarray]:
    peft_model.double()
    return {
        name: layer.get_delta_weight("default").detach().numpy()
        for name, layer in _lora_layers(peft_model).items()
    }


def _truncate(delta: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def _assert_truncated(before: dict[str, np.ndarray], after: dict[str, np.ndarray], ranks: dict[str, int]) -> None:
    assert set(after) == set(before)
    for name, delta in before.items():
        expected = _truncate(delta, ranks[name])
        scale = np.linalg.norm(delta)
        assert np.linalg.norm(after[name] - expected) <= 2e-6 * scale, name  # float32 factors


# --- PEFT ground truth ------------------------------------------------------------------------

LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_patterns": dict(
        r=4, lora_alpha=8, use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={r"layers\.1\..*q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.down_proj": 5},
    ),
}
SELECTORS = [{"rank": 2}, {"rank": 1}, {"energy": 0.8}, {"policy": "knee"}, {"policy": "p90"}, {"budget_params": 1000}]


@pytest.mark.parametrize("config_name", sorted(LLAMA_CONFIGS))
@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_compressed_adapter_loads_in_peft_and_is_the_truncated_svd(
    tmp_path: Path, config_name: str, selector: dict[str, Any]
) -> None:
    peft_model = _save_peft(_tiny_llama(), LoraConfig(**LLAMA_CONFIGS[config_name]), tmp_path / "in")
    before = _deltas(peft_model)
    report = compress(tmp_path / "in", tmp_path / "out", **selector)
    ranks = {m.name: m.r_after for m in report.modules}
    loaded = _load_peft(tmp_path / "out")
    layers = _lora_layers(loaded)
    assert {n: layer.r["default"] for n, layer in layers.items()} == ranks
    for m in report.modules:  # PEFT applies the scale the report says it will
        assert layers[m.name].scaling["default"] == pytest.approx(m.scale_after, rel=1e-12)
        assert layers[m.name].lora_alpha["default"] == m.alpha
    _assert_truncated(before, _deltas(loaded), ranks)
    if "budget_params" in selector:
        assert report.params_after <= selector["budget_params"]
    # the errors in the report are those of the truncation PEFT now applies
    for m in report.modules:
        delta = before[m.name]
        err = np.linalg.norm(delta - _truncate(delta, m.r_after)) / np.linalg.norm(delta)
        assert m.relative_frobenius_error == pytest.approx(err, rel=1e-6, abs=1e-9)


def test_gpt2_conv1d_fan_in_fan_out_adapter(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"])
    before = _deltas(_save_peft(_tiny_gpt2(), config, tmp_path / "in"))
    report = compress(tmp_path / "in", tmp_path / "out", rank=2)
    after = _deltas(_load_peft(tmp_path / "out", _tiny_gpt2()))
    _assert_truncated(before, after, {m.name: 2 for m in report.modules})


def test_modules_to_save_and_other_tensors_are_copied_unchanged(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _save_peft(_tiny_llama(), config, tmp_path / "in")
    compress(tmp_path / "in", tmp_path / "out", rank=2)
    src, dst = Adapter.open(tmp_path / "in"), Adapter.open(tmp_path / "out")
    assert src.other_tensors and sorted(dst.other_tensors) == sorted(src.other_tensors)
    for name in src.other_tensors:
        assert np.array_equal(src.file.read(name), dst.file.read(name)), name
    assert sorted(dst.file.names) == sorted(src.file.names)  # same key names
    _load_peft(tmp_path / "out")


def test_bf16_peft_adapter_stays_bf16_and_loads(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = _save_peft(_tiny_llama(), config, tmp_path / "f32")
    peft_model.to(torch.bfloat16)
    peft_model.save_pretrained(tmp_path / "in")
    assert {i.dtype for i in TensorFile(tmp_path / "in" / "adapter_model.safetensors")} == {"BF16"}
    report = compress(tmp_path / "in", tmp_path / "out", rank=2)
    assert {i.dtype for i in TensorFile(tmp_path / "out" / "adapter_model.safetensors")} == {"BF16"}
    assert 0 < report.storage_error < 1e-2  # bf16 rounding of the new factors, measured
    before = _deltas(_load_peft(tmp_path / "in"))  # the bf16 values, applied in float64
    after = _deltas(_load_peft(tmp_path / "out"))
    for name, delta in before.items():
        err = np.linalg.norm(after[name] - _truncate(delta, 2)) / np.linalg.norm(delta)
        assert err < 1e-2, name


# --- closed form on factory adapters --------------------------------------------------------


def _factory(tmp_path: Path, dtype: Any = np.float32, **kw: Any) -> Path:
    mods = {
        Q0: ModuleSpec(32, 32, [4.0, 2.0, 1.0, 0.5]),
        Q1: ModuleSpec(32, 32, [3.0, 3.0, 3.0]),
        DOWN0: ModuleSpec(32, 64, [1.0]),
    }
    return write_adapter(tmp_path / "in", AdapterSpec(modules=mods, r=8, lora_alpha=16, **kw), dtype=dtype)


def test_errors_and_counts_are_closed_form(tmp_path: Path) -> None:
    report = compress(_factory(tmp_path), tmp_path / "out", rank=2)
    rows = {m.name: m for m in report.modules}
    q0 = rows[Q0]
    assert q0.retained_energy == pytest.approx(20 / 21.25, rel=1e-6)
    assert q0.relative_frobenius_error == pytest.approx(math.sqrt(1.25 / 21.25), rel=1e-6)
    assert q0.relative_spectral_error == pytest.approx(1 / 4, rel=1e-6)
    assert rows[Q1].relative_spectral_error == pytest.approx(1.0, rel=1e-6)  # σ₃ = σ₁
    assert rows[Q1].retained_energy == pytest.approx(2 / 3, rel=1e-6)
    assert rows[DOWN0].relative_frobenius_error == pytest.approx(0.0, abs=1e-6)
    assert (q0.params_before, q0.params_after) == (8 * 64, 2 * 64)
    assert rows[DOWN0].params_after == 2 * 96
    assert report.params_before == 2 * 8 * 64 + 8 * 96
    assert report.params_after == 2 * 2 * 64 + 2 * 96
    assert report.param_reduction == pytest.approx(1 - 448 / 1792)
    tails, total = 1.25 + 9.0, 21.25 + 27.0 + 1.0
    assert report.relative_frobenius_error == pytest.approx(math.sqrt(tails / total), rel=1e-6)
    assert report.retained_energy == pytest.approx(1 - tails / total, rel=1e-6)
    assert report.relative_spectral_error == pytest.approx(1.0, rel=1e-6)
    assert q0.scale_after == pytest.approx(16 / 2) and q0.scale_before == pytest.approx(16 / 8)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (2, 16, {}, {})
    # reading the output back gives the truncated spectrum
    back = {m.name: m for m in audit(tmp_path / "out").modules}
    np.testing.assert_allclose(back[Q0].singular_values, [4.0, 2.0], rtol=1e-5)


def test_energy_and_policies_follow_the_shared_rank_logic(tmp_path: Path) -> None:
    d = _factory(tmp_path)
    ranks = {m.name: m.r_after for m in compress(d, tmp_path / "e", energy=0.9).modules}
    assert ranks == {Q0: 2, Q1: 3, DOWN0: 1}  # 20/21.25 = 0.94
    audited = audit(d)
    per_module = compress(d, tmp_path / "pm", policy="per-module")
    assert {m.name: m.r_after for m in per_module.modules} == audited.suggestion.rank_pattern
    median = compress(d, tmp_path / "med", policy="median")
    assert {m.r_after for m in median.modules} == {audited.suggestion.uniform_median}
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert cfg["r"] in (2, 3, 1) and len(cfg["rank_pattern"]) == 2
    oht = compress(d, tmp_path / "oht", policy="optimal_hard_threshold")
    assert all(m.r_after >= 1 for m in oht.modules)


def test_rank_pattern_and_alpha_pattern_in_the_input_are_honoured(tmp_path: Path) -> None:
    d = _factory(tmp_path, rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"down_proj": 2.0})
    report = compress(d, tmp_path / "out", rank=3)
    rows = {m.name: m for m in report.modules}
    assert rows[Q1].r_before == 4 and rows[DOWN0].alpha == 2.0
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == {DOWN0: 2.0}
    back = {m.name: m for m in audit(tmp_path / "out").modules}
    assert back[DOWN0].scale == pytest.approx(2.0 / 3)
    np.testing.assert_allclose(back[Q0].singular_values, [4.0, 2.0, 1.0], rtol=1e-5)


def test_bf16_factory_adapter_stays_bf16(tmp_path: Path) -> None:
    report = compress(_factory(tmp_path, dtype=ml_dtypes.bfloat16), tmp_path / "out", rank=2)
    assert {i.dtype for i in TensorFile(tmp_path / "out" / "adapter_model.safetensors")} == {"BF16"}
    back = {m.name: m for m in audit(tmp_path / "out").modules}
    np.testing.assert_allclose(back[Q0].singular_values, [4.0, 2.0], rtol=2e-2)
    assert report.storage_error < 1e-2


def test_budget_is_spent_by_energy_per_parameter(tmp_path: Path) -> None:
    report = audit(_factory(tmp_path))
    rows = {m.name: m for m in report.modules}
    cost_q, cost_down = 64, 96
    minimum = 2 * cost_q + cost_down
    assert budget_ranks(report.modules, minimum) == {Q0: 1, Q1: 1, DOWN0: 1}
    # increments by σ²/cost: Q1 9/64 (twice), Q0 4/64, Q0 1/64, Q0 .25/64; DOWN0 has none
    assert budget_ranks(report.modules, minimum + 2 * cost_q) == {Q0: 1, Q1: 3, DOWN0: 1}
    assert budget_ranks(report.modules, minimum + 3 * cost_q + 10) == {Q0: 2, Q1: 3, DOWN0: 1}
    assert budget_ranks(report.modules, 10**9) == {Q0: 4, Q1: 3, DOWN0: 1}  # zero σ never bought
    assert rows[Q0].r == 8
    with pytest.raises(UsageError, match="minimum 224"):
        budget_ranks(report.modules, minimum - 1)


# --- pattern keys, refusals, the writer -------------------------------------------------------


def test_pattern_keys_match_exactly_their_module() -> None:
    modules = ["a.q", "x.a.q", "a.qq", "b.layers.1.q", "b.layers.11.q", "blayers.1.q"]
    keys = exact_pattern_keys({m: i for i, m in enumerate(modules)}, modules)
    assert len(keys) == len(modules)
    for key, i in keys.items():
        assert [m for m in modules if pattern_key([key], m)] == [modules[i]]
    assert "b.layers.1.q" in keys  # a plain path is kept where it is unambiguous
    assert "^a\\.q" in keys  # `a.q` also ends `x.a.q`: anchored
    assert pattern_key(list(keys), "x.a.q") == "x.a.q"
    from peft.utils.other import get_pattern_key  # PEFT resolves every module to its own key

    assert all(get_pattern_key(list(keys), m) == k for k, i in keys.items() for m in [modules[i]])


def test_refusals(tmp_path: Path) -> None:
    d = _factory(tmp_path)
    with pytest.raises(UsageError, match="input adapter directory"):
        compress(d, d, rank=2)
    compress(d, tmp_path / "out", rank=2)
    with pytest.raises(UsageError, match="--force"):
        compress(d, tmp_path / "out", rank=1)
    assert compress(d, tmp_path / "out", rank=1, force=True).r == 1
    for bad in ({}, {"rank": 2, "energy": 0.9}, {"rank": 0}, {"energy": 1.5}, {"policy": "nope"}):
        with pytest.raises(UsageError):
            compress(d, tmp_path / "o2", **bad)
    assert not (tmp_path / "o2").exists()


def test_dora_is_refused(tmp_path: Path) -> None:
    _save_peft(_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        compress(tmp_path / "dora", tmp_path / "out", rank=2)


def test_safetensors_writer_round_trips_mixed_dtypes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {
        "b": np.arange(3, dtype=np.float16), "a": np.ones((2, 3), dtype=ml_dtypes.bfloat16),
        "c": np.arange(6, dtype=np.float64).reshape(3, 2), "d": np.array([1, 2, 3], dtype=np.int8),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = TensorFile(tmp_path / "t.safetensors")
    for name, t in tensors.items():
        assert back.read(name).dtype == t.dtype and np.array_equal(back.read(name), t)
    loaded = load_file(str(tmp_path / "t.safetensors"))  # the reference reader agrees
    assert loaded["a"].dtype == torch.bfloat16 and loaded["c"].tolist() == tensors["c"].tolist()
    assert not list(tmp_path.glob(".*tmp"))


# --- the CLI ---------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False)


def test_cli_json_equals_the_report_and_text_renders(tmp_path: Path) -> None:
    d = _factory(tmp_path)
    proc = _run("compress", "--peft-dir", str(d), "--out-dir", str(tmp_path / "cli"), "--energy", "0.9", "--json")
    assert proc.returncode == 0, proc.stderr
    api = compress(d, tmp_path / "api", energy=0.9).to_dict()
    got = json.loads(proc.stdout)
    assert got.pop("out_dir") == str(tmp_path / "cli")
    api.pop("out_dir")
    assert got == json.loads(json.dumps(api))
    proc = _run("compress", "--peft-dir", str(d), "--out-dir", str(tmp_path / "txt"), "--budget-params", "600")
    assert proc.returncode == 0, proc.stderr
    assert "GRADIENCE LoRA COMPRESS" in proc.stdout and "Relative Frobenius error" in proc.stdout
    assert Q0 in proc.stdout


def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    d = _factory(tmp_path)
    proc = _run("compress", "--peft-dir", str(d), "--out-dir", str(d), "--rank", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("Error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert str(d) in proc.stderr
    proc = _run("compress", "--peft-dir", str(d), "--out-dir", str(tmp_path / "o"), "--rank", "2", "--energy", "0.9")
    assert proc.returncode == 2  # argparse: mutually exclusive
    assert re.search(r"not allowed with", proc.stderr)


# --- verify: the caller's eval before and after --------------------------------------------


def test_verify_scores_the_input_before_writing_and_the_output_after(tmp_path: Path) -> None:
    d, out = _factory(tmp_path), tmp_path / "out"
    calls: list[tuple[Path, bool]] = []

    def fake_eval(adapter_dir: Path) -> dict[str, Any]:
        calls.append((adapter_dir, out.exists()))
        r = audit(adapter_dir).r
        return {"accuracy": 0.5 + r / 100, "loss": float("nan") if r == 2 else 0.25, "label": "x", "n": 7}

    report = compress(d, out, rank=2, verify=fake_eval)
    assert calls == [(d, False), (out, True)]  # the input is scored before anything is written
    v = report.verify
    assert v is not None and v.evaluator == "fake_eval"
    assert v.before == {"accuracy": 0.58, "loss": 0.25, "n": 7.0}  # non-numbers dropped
    assert v.after == {"accuracy": 0.52, "loss": None, "n": 7.0}  # NaN kept as None
    assert v.delta == pytest.approx({"accuracy": -0.06, "loss": None, "n": 0.0})
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["verify"]["delta"]["loss"] is None
    assert compress(d, tmp_path / "plain", rank=2).verify is None


def test_verify_must_return_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="dict of metrics"):
        compress(_factory(tmp_path), tmp_path / "out", rank=2, verify=lambda p: 0.9)  # type: ignore[arg-type,return-value]
    assert not (tmp_path / "out").exists()


def test_cli_verify_refuses_an_adapter_of_another_task_before_writing(tmp_path: Path) -> None:
    d = _factory(tmp_path)
    proc = _run("compress", "--peft-dir", str(d), "--out-dir", str(tmp_path / "o"), "--rank", "2", "--verify")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Error: ") and "demo task" in proc.stderr and "verify=fn" in proc.stderr
    assert not (tmp_path / "o").exists()
