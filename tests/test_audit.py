"""Audit aggregates, suggestions and the per-type / per-layer views on known spectra."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gradience.errors import UsageError
from gradience.mechanic.audit import Float64Buffers, audit, audit_module, default_grid, round_up
from tests.factories import AdapterSpec, ModuleSpec, expected_metrics, write_adapter


def _two_layer_spec(**kw: object) -> AdapterSpec:
    mods = {}
    for layer, sig in ((0, [4.0, 0.5]), (1, [2.0, 2.0, 2.0, 2.0, 0.1])):
        mods[f"model.layers.{layer}.self_attn.q_proj"] = ModuleSpec(64, 64, sig)
        mods[f"model.layers.{layer}.mlp.down_proj"] = ModuleSpec(64, 128, [1.0])
    return AdapterSpec(modules=mods, r=8, lora_alpha=16, **kw)  # type: ignore[arg-type]


def test_module_metrics_and_aggregates_match_closed_form(tmp_path: Path) -> None:
    spec = _two_layer_spec()
    report = audit(write_adapter(tmp_path / "a", spec))
    by_name = {m.name: m for m in report.modules}
    for name, m in spec.modules.items():
        exp = expected_metrics(m.sigma, 8, (m.out_features, m.in_features))
        got = by_name[name]
        for key, value in exp.items():
            assert getattr(got, key) == pytest.approx(value, rel=1e-6), (name, key)
    srs = [expected_metrics(m.sigma, 8, (1, 1))["stable_rank"] for m in spec.modules.values()]
    assert report.summary.stable_rank_mean == pytest.approx(np.mean(srs), rel=1e-9)
    assert report.summary.n_modules == 4 and report.summary.n_layers == 2
    assert report.summary.lora_params == 2 * (8 * 64 + 64 * 8) + 2 * (8 * 128 + 64 * 8)
    # energy ranks: q0 -> 1, q1 -> 4, down -> 1, 1  => p50 = 1, p90 = 3.1 (linear interpolation)
    assert report.summary.energy_rank_p50 == pytest.approx(1.0)
    assert report.summary.energy_rank_p90 == pytest.approx(3.1)


def test_suggestions_round_up_on_the_grid_and_never_exceed_r(tmp_path: Path) -> None:
    report = audit(write_adapter(tmp_path / "a", _two_layer_spec()))
    s = report.suggestion
    assert s.grid == (1, 2, 4, 8)
    assert (s.uniform_median, s.uniform_p90) == (1, 4)
    assert not s.at_allocated_rank
    assert s.rank_pattern["model.layers.1.self_attn.q_proj"] == 4
    assert s.rank_pattern["model.layers.0.mlp.down_proj"] == 1
    assert "verify" in s.note
    assert round_up(2.5, default_grid(8)) == 4
    assert round_up(9, default_grid(8)) == 8
    assert default_grid(24) == (1, 2, 4, 8, 16, 24)


def test_full_rank_adapter_says_the_suggestion_is_at_the_allocated_rank(tmp_path: Path) -> None:
    spec = AdapterSpec(modules={"m.layers.0.q_proj": ModuleSpec(32, 32, [1.0] * 4)}, r=4, lora_alpha=4)
    report = audit(write_adapter(tmp_path / "a", spec))
    assert report.suggestion.uniform_p90 == 4
    assert report.suggestion.at_allocated_rank


def test_wasteful_lists_lowest_utilization_first(tmp_path: Path) -> None:
    report = audit(write_adapter(tmp_path / "a", _two_layer_spec()), top_wasteful=2)
    assert len(report.wasteful) == 2
    utils = [m.utilization for m in report.wasteful]
    assert utils == sorted(utils)
    assert all(m.name.endswith("down_proj") for m in report.wasteful)


def test_type_breakdown_and_layer_gain(tmp_path: Path) -> None:
    report = audit(write_adapter(tmp_path / "a", _two_layer_spec()))
    types = {t.type: t for t in report.by_type}
    assert set(types) == {"attn", "mlp"} and types["attn"].n_modules == 2
    e0, e1 = 16.25 + 1.0, 16.01 + 1.0  # Σσ² per layer
    shares = [g.share for g in report.gain.layers]
    assert shares == pytest.approx([e0 / (e0 + e1), e1 / (e0 + e1)], rel=1e-9)
    hhi = sum(x * x for x in shares)
    assert report.gain.concentration == pytest.approx((hhi - 0.5) / 0.5, abs=1e-12)


def test_rslora_and_patterns_change_the_scale_not_the_recovered_spectrum(tmp_path: Path) -> None:
    spec = _two_layer_spec(use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0})
    report = audit(write_adapter(tmp_path / "a", spec))
    for m in report.modules:
        assert m.scale == pytest.approx(spec.scale(m.name))
        assert m.r == spec.rank(m.name)
        assert m.sigma_max == pytest.approx(spec.modules[m.name].sigma[0], rel=1e-9)


def test_embedding_lora_is_audited_with_embedding_shape(tmp_path: Path) -> None:
    spec = AdapterSpec(modules={"model.embed_tokens": ModuleSpec(1000, 64, [3.0, 1.0], embedding=True)}, r=4)
    m = audit(write_adapter(tmp_path / "a", spec)).modules[0]
    assert (m.kind, m.type, m.shape) == ("embedding", "embed", (1000, 64))
    assert m.sigma_max == pytest.approx(3.0, rel=1e-9)


def test_bf16_adapter(tmp_path: Path) -> None:
    spec = _two_layer_spec()
    report = audit(write_adapter(tmp_path / "a", spec, dtype=ml_dtypes.bfloat16))
    for m in report.modules:
        assert m.sigma_max == pytest.approx(spec.modules[m.name].sigma[0], rel=2e-2)


def test_zero_and_nan_modules_are_reported_and_the_rest_audited(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    d = write_adapter(tmp_path / "a", _two_layer_spec())
    weights = load_file(str(d / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"][:] = 0.0
    weights["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"][0, 0] = np.nan
    save_file(weights, str(d / "adapter_model.safetensors"))
    report = audit(d)
    status = {m.name: m.status for m in report.modules}
    assert status["model.layers.0.mlp.down_proj"] == "zero"
    assert status["model.layers.1.mlp.down_proj"] == "nonfinite"
    assert status["model.layers.0.self_attn.q_proj"] == "ok"
    assert any("NaN" in w for w in report.warnings) and any("all-zero" in w for w in report.warnings)
    assert report.summary.n_modules == 4
    json.dumps(report.to_dict(), allow_nan=False)  # the NaN never reaches the output


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a", _two_layer_spec())
    with pytest.raises(UsageError, match="energy"):
        audit(d, energy=1.5)
    with pytest.raises(UsageError, match="top-least-used"):
        audit(d, top_wasteful=-1)


def test_report_is_deterministic(tmp_path: Path) -> None:
    d = write_adapter(tmp_path / "a", _two_layer_spec())
    assert json.dumps(audit(d).to_dict()) == json.dumps(audit(d).to_dict())


def test_reused_cast_buffers_give_what_fresh_casts_give(tmp_path: Path) -> None:
    """One pair of buffers serves modules of every shape in turn (large, small, large again)
    with the same figures as a fresh float64 copy per module."""
    from gradience.lora.reader import Adapter, LoraModule

    report = audit(write_adapter(tmp_path / "a", _two_layer_spec(), dtype=ml_dtypes.bfloat16))
    modules = [m for m in Adapter.open(tmp_path / "a").modules() if isinstance(m, LoraModule)]
    assert len({m.shape for m in modules}) > 1
    fresh = {m.name: audit_module(m) for m in modules}
    shared = Float64Buffers()
    for m in [*modules, *reversed(modules)]:
        assert audit_module(m, buffers=shared) == fresh[m.name]
    for row in report.modules:
        assert row.singular_values == fresh[row.name].singular_values
