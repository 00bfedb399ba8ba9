"""Tests for gradience.analysis and `gradience analyze`: known answers on synthetic runs.

Every log is written with the real `RunWriter`, so the tests also pin the join between the
telemetry records and the analysis. Lag convention under test: a positive lag means
structure LEADS eval loss.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradience.analysis import (
    LAG_CONVENTION,
    EarlyStopPolicy,
    Series,
    align_exact,
    analyze,
    ccf,
    detect_cadence,
    eval_patience_stop,
    forward_fill_align,
    granger,
    granger_test,
    load_run,
    modal_step,
    pearson,
    plateau_stop,
    ridge_forecast,
    simulate_early_stop,
    spearman,
)
from gradience.cli import main
from gradience.errors import MissingDependencyError, TelemetryError, UsageError
from gradience.telemetry import RunWriter

GRADIENCE = str(Path(sys.executable).parent / "gradience")
METRICS = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90")


# --------------------------------------------------------------------------- run-log factory


def write_log(
    path: Path,
    evals: Mapping[int, float],
    structural: Mapping[int, Mapping[str, float]],
    *,
    split: str = "test",
    other_splits: tuple[str, ...] = (),
    interval: int | None = None,
) -> Path:
    """A run log as the Trainer callback writes it: train steps, structural records, evals."""
    with RunWriter(path, clock=lambda: 1767225600.0) as log:
        log.write("run_start", step=0, config={"r": 8}, structural_interval=interval,
                  eval_policy="steps")  # fmt: skip
        for step in sorted(set(evals) | set(structural)):
            log.write("train_step", step=step, loss=1.0, lr=1e-4, grad_norm=0.5)
            if step in structural:
                reason = "eval" if step in evals else "interval"
                log.write("metrics", step=step, kind="structural", reason=reason,
                          metrics=dict(structural[step]), modules={}, cost_ms=1.0)  # fmt: skip
            if step in evals:
                log.write("eval", step=step, split=split, metrics={"loss": evals[step]})
                for other in other_splits:
                    log.write("eval", step=step, split=other, metrics={"loss": 99.0})
        log.write("run_end", step=max(evals, default=0), status="ok")
    return path


def metrics_of(value: float) -> dict[str, float]:
    """Structural metrics that all move with one underlying value."""
    return {"frobenius_norm": value, "sigma_max": 0.5 * value + 0.1, "stable_rank": 1.0 + 0.2 * value,
            "energy_rank_90": 2.0 + value}  # fmt: skip


def run_from(
    path: Path, steps: np.ndarray, structure: np.ndarray, loss: np.ndarray,
    structural_steps: np.ndarray | None = None, **kw: Any,
) -> Path:  # fmt: skip
    """Log `loss` at every step and `structure` at `structural_steps` (default: every step)."""
    keep = set((steps if structural_steps is None else structural_steps).tolist())
    evals = {int(s): float(v) for s, v in zip(steps, loss, strict=True)}
    struct = {
        int(s): metrics_of(float(v)) for s, v in zip(steps, structure, strict=True) if s in keep
    }
    return write_log(path, evals, struct, **kw)


def jump_process(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synchronous structure and eval loss on a 25-step grid whose moves all happen in the
    intervals ending at odd multiples of 25, i.e. between two 50-step snapshots."""
    rng = np.random.default_rng(seed)
    steps = 25 * np.arange(1, n + 1)
    moves = np.where(steps % 50 == 25, rng.uniform(0.5, 1.5, n), 0.02 * rng.standard_normal(n))
    structure = 1.0 + np.cumsum(moves)
    loss = 3.0 - 0.05 * structure + 0.001 * rng.standard_normal(n)
    return steps, structure, loss


# --------------------------------------------------------------------------- correlation


def test_pearson_matches_the_analytic_r() -> None:
    # eval loss = a·frob + noise with the noise exactly orthogonal to frob (after centring),
    # so the sample r is a‖x‖ / sqrt(a²‖x‖² + ‖e‖²) exactly.
    rng = np.random.default_rng(1)
    x = rng.standard_normal(200)
    x -= x.mean()
    e = rng.standard_normal(200)
    e -= e.mean()
    e -= (e @ x) / (x @ x) * x
    a = -0.7
    y = 2.0 + a * x + e
    expected = a * np.linalg.norm(x) / math.hypot(a * np.linalg.norm(x), np.linalg.norm(e))
    got = pearson(x, y)
    assert got.r == pytest.approx(expected, abs=1e-12)
    assert got.n == 200 and got.p is not None and got.p < 1e-6
    assert spearman(x, np.exp(x)).r == pytest.approx(1.0)


def test_correlation_is_none_with_a_reason_when_undefined() -> None:
    assert pearson(np.ones(5), np.arange(5.0)).r is None
    short = spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0]))
    assert short.r is None and "need at least 3" in (short.reason or "")


def test_ccf_finds_a_known_lead_with_the_documented_sign() -> None:
    walk = np.random.default_rng(2).standard_normal(80).cumsum()
    structure, loss = walk[2:], walk[:-2]  # loss[t] = structure[t - 2]: structure leads by 2
    lead = ccf(structure, loss, max_lag=3)
    assert lead.best_lag == 2 and lead.significant
    assert lead.band == pytest.approx(1.96 / math.sqrt(77))
    assert lead.values[lead.lags.index(2)] == pytest.approx(lead.best_value)
    assert ccf(loss, structure, max_lag=3).best_lag == -2  # roles swapped: it lags
    assert ccf(walk, walk, max_lag=3).best_lag == 0
    assert "LEADS" in LAG_CONVENTION


def test_analyze_reports_a_known_lead_from_a_matched_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    steps = 25 * np.arange(1, 51)
    structure = 1.0 + np.abs(rng.standard_normal(52)).cumsum()
    loss = 5.0 - 0.1 * structure[:-2] + 0.001 * rng.standard_normal(50)  # 2 evals behind
    log = run_from(tmp_path / "run.jsonl", steps, structure[2:], loss)
    pair = analyze(log, metrics=["frobenius_norm"]).to_dict()["pairs"][0]
    assert pair["best_lag"] == 2 and pair["lead_lag_refused"] is False
    assert pair["ccf"]["basis"] == "differences"
    assert pair["ccf"]["differences"]["best_lag"] == 2


# --------------------------------------------------------------------------- Granger


def test_granger_detects_an_injected_lead_and_not_the_reverse() -> None:
    reverse_hits = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        structure = rng.standard_normal(400).cumsum()
        # eval loss follows structure one eval later, plus its own independent wander
        loss = -0.8 * np.r_[0.0, structure[:-1]] + 0.5 * rng.standard_normal(400).cumsum()
        result = granger(structure, loss, max_lag=3)
        assert result.reason is None and result.n == 399
        s_to_e, e_to_s = result.structure_to_eval, result.eval_to_structure
        assert s_to_e is not None and e_to_s is not None and e_to_s.min_p is not None
        assert s_to_e.min_p is not None and s_to_e.min_p < 1e-6 and s_to_e.lag_at_min_p == 1
        assert len(s_to_e.p_values) == len(e_to_s.p_values) == 3
        reverse_hits += e_to_s.min_p < 0.05
    # No reverse effect exists; the min over 3 lags is < 0.05 by chance ~10-15% of the time.
    assert reverse_hits <= 1


def test_granger_on_a_short_series_returns_none_with_a_reason() -> None:
    test, reason = granger_test(np.arange(6.0), np.arange(6.0) ** 2, max_lag=3)
    assert test is None and reason is not None and "needs 13" in reason
    both = granger(np.arange(6.0), np.arange(6.0) ** 2, max_lag=3)
    assert both.structure_to_eval is None and both.eval_to_structure is None and both.reason


# --------------------------------------------------------------------------- forecast


def test_ridge_r2_is_one_on_a_noiseless_linear_relation() -> None:
    t = np.linspace(0.0, 1.0, 60)
    X = np.column_stack([np.sqrt(t), t**2, np.sin(3 * t)])
    y = 1.5 - 2.0 * X[:, 0] + 0.5 * X[:, 1] + 0.3 * X[:, 2]
    score = ridge_forecast(X, y, alpha=1e-8)
    assert score.r2 is not None and score.r2 > 0.9999
    assert (score.n_train, score.n_test) == (41, 18)  # row 0 has no previous eval
    ahead = ridge_forecast(X, np.r_[y[0], y[:-1]], horizon=1, alpha=1e-8)  # loss[t+1] = f(X[t])
    assert ahead.r2 is not None and ahead.r2 > 0.999


def test_ridge_r2_is_not_positive_on_noise() -> None:
    rng = np.random.default_rng(5)
    scores = [
        ridge_forecast(rng.standard_normal((60, 3)), rng.standard_normal(60)).r2 for _ in range(5)
    ]
    assert all(s is not None for s in scores)
    assert float(np.mean([s or 0.0 for s in scores])) < 0.0
    short = ridge_forecast(np.ones((3, 1)), np.ones(3))
    assert short.r2 is None and short.reason


# --------------------------------------------------------------------------- early stopping

U_CURVE = [1.0, 0.8, 0.6, 0.5, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9]
PLATEAU = [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]


def test_early_stop_on_a_u_shaped_eval_curve() -> None:
    steps = np.arange(10, 101, 10)
    loss = Series("eval_loss", steps, np.array(U_CURVE))
    frob = Series("frobenius_norm", steps, np.array(PLATEAU))
    policy = EarlyStopPolicy(patience=3, window=3, threshold=0.01)
    result = simulate_early_stop(loss, {"frobenius_norm": frob}, policy)
    assert (result.best_eval_loss, result.best_step, result.last_step) == (0.45, 50, 100)
    by_eval, by_frob = result.outcomes
    # Best at step 50; three evals without improvement: stop at step 80 (0.7), 8 evals spent.
    assert (by_eval.stop_step, by_eval.eval_calls, by_eval.stopped) == (80, 8, True)
    assert by_eval.regret == pytest.approx(0.25) and by_eval.steps_saved == 20
    # frob is flat over indices 4..6 first: stop at step 70 (loss 0.6), one eval spent.
    assert (by_frob.stop_step, by_frob.eval_calls, by_frob.loss_at_stop) == (70, 1, 0.6)
    assert by_frob.regret == pytest.approx(0.15)
    d = result.to_dict()
    assert [r["rule"] for r in d["rules"]] == ["eval_patience", "plateau"]


def test_stop_rules_that_never_fire_run_to_the_end() -> None:
    falling = np.linspace(1.0, 0.1, 10)
    assert eval_patience_stop(falling, patience=2) is None
    assert plateau_stop(np.arange(10), np.arange(1.0, 11.0), window=4, threshold=0.01) is None
    assert plateau_stop(np.arange(6), np.zeros(6), window=3, threshold=0.01) is None  # not started
    steps = np.arange(1, 11)
    result = simulate_early_stop(Series("eval_loss", steps, falling), {})
    assert result.outcomes[0].stopped is False and result.outcomes[0].stop_step == 10
    assert result.outcomes[0].eval_calls == 10 and result.outcomes[0].regret == 0.0
    with pytest.raises(ValueError, match="patience"):
        EarlyStopPolicy(patience=0)


# --------------------------------------------------------------------------- cadence, artifact


def test_cadence_detection() -> None:
    c = detect_cadence(np.arange(50, 1201, 50), np.arange(25, 1201, 25), declared=50)
    assert (c.matched, c.structural_every, c.eval_every) == (False, 50, 25)
    assert (c.unmatched_eval_steps, c.matched_steps, c.eval_steps) == (24, 24, 48)
    fine = detect_cadence(np.arange(10, 1001, 10), np.arange(200, 1001, 200))
    assert fine.matched and fine.structural_every == 10 and fine.eval_every == 200
    assert modal_step([0, 25, 50, 75, 100, 112]) == 25  # a final odd step does not count
    assert modal_step([7]) is None


def test_forward_fill_makes_a_spurious_lag_that_analyze_refuses(tmp_path: Path) -> None:
    """Research note 004's artifact: structure every 50 steps, eval every 25, synchronous."""
    steps, structure, loss = jump_process()
    coarse = steps[steps % 50 == 0]
    log = run_from(tmp_path / "run.jsonl", steps, structure, loss, coarse, interval=50)
    run = load_run(log)
    naive = forward_fill_align(run.structural["frobenius_norm"], run.eval_loss)
    assert len(naive) == 47  # every eval from step 50 on gets a (mostly stale) value
    spurious = ccf(naive.x, naive.y, max_lag=3)
    # Stale snapshots trail the loss by one eval: a lag of one interval, -1 in our convention
    # (structure seems to LAG). statsmodels' ccf(x, y)[k] = corr(x[t+k], y[t]) has the
    # opposite sign and reads the same artifact as +1: the "+1 lead" of the research note.
    assert spurious.best_lag == -1 and spurious.significant
    from statsmodels.tsa.stattools import ccf as sm_ccf

    sm = sm_ccf(np.diff(naive.x), np.diff(naive.y), adjusted=False, nlags=4)
    assert int(np.argmax(np.abs(sm))) == 1

    report = analyze(log).to_dict()
    cadence = report["cadence"]
    assert cadence == {"matched": False, "structural_every": 50, "eval_every": 25,
                       "unmatched_eval_steps": 24, "eval_steps": 48, "structural_steps": 24,
                       "matched_steps": 24, "declared_structural_interval": 50}  # fmt: skip
    for pair in report["pairs"]:
        assert pair["n"] == 24 and pair["best_lag"] is None and pair["lead_lag_refused"] is True
        assert "not covered" in pair["lead_lag_reason"] and pair["granger"] is None
        assert pair["pearson_r"] is not None and pair["pearson_r"] < -0.99  # same-step r kept
    assert report["forecast"]["one_step"] is None and "refused" in report["forecast"]["reason"]

    # The same process logged at a matched 25/25 cadence: synchronous, no lead.
    matched = analyze(run_from(tmp_path / "m.jsonl", steps, structure, loss)).to_dict()
    assert matched["cadence"]["matched"] is True
    assert {p["best_lag"] for p in matched["pairs"]} == {0}


def test_too_few_matched_points_refuse_the_lag(tmp_path: Path) -> None:
    steps = 10 * np.arange(1, 7)
    log = run_from(tmp_path / "run.jsonl", steps, np.arange(6.0), 1.0 / (1.0 + np.arange(6.0)))
    report = analyze(log, metrics=["frobenius_norm"]).to_dict()
    pair = report["pairs"][0]
    assert report["cadence"]["matched"] is True
    assert (
        pair["best_lag"] is None
        and pair["lead_lag_refused"]
        and "at least 8" in pair["lead_lag_reason"]
    )
    assert pair["spearman_r"] == pytest.approx(-1.0)


# --------------------------------------------------------------------------- properties


step_sets = st.sets(st.integers(min_value=0, max_value=500), max_size=40)


@settings(max_examples=100, deadline=None)
@given(step_sets, step_sets)
def test_alignment_never_invents_a_step(a: set[int], b: set[int]) -> None:
    sa = Series.from_points("a", {s: float(s) for s in a})
    sb = Series.from_points("b", {s: -float(s) for s in b})
    pair = align_exact(sa, sb)
    assert set(pair.steps.tolist()) == a & b
    assert np.array_equal(pair.x, pair.steps.astype(float))  # each value from its own step
    assert np.array_equal(pair.y, -pair.steps.astype(float))
    filled = forward_fill_align(sa, sb)
    assert set(filled.steps.tolist()) <= b  # the naive fill keeps to the grid's steps too


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=0, max_size=30))
def test_pearson_is_within_bounds_or_none(points: list[tuple[float, float]]) -> None:
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    for result in (pearson(x, y), spearman(x, y)):
        assert result.r is None or -1.0 <= result.r <= 1.0
        assert result.r is not None or result.reason


# --------------------------------------------------------------------------- loading, report


def test_split_choice_and_errors(tmp_path: Path) -> None:
    steps = 10 * np.arange(1, 11)
    kw: dict[str, Any] = {"other_splits": ("train", "validation")}
    log = run_from(tmp_path / "run.jsonl", steps, np.arange(10.0), np.linspace(1, 0.5, 10), **kw)
    assert load_run(log).target_split == "test"
    assert load_run(log, target_split="validation").eval_loss.values.tolist() == [99.0] * 10
    with pytest.raises(TelemetryError, match="no eval loss for split `dev`"):
        load_run(log, target_split="dev")
    train_only = run_from(tmp_path / "t.jsonl", steps, np.arange(10.0), np.ones(10), split="train")
    with pytest.raises(TelemetryError, match="no held-out eval split"):
        load_run(train_only)
    with pytest.raises(UsageError, match="not found"):
        analyze(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match="max_lag"):
        analyze(log, max_lag=0)


def test_report_shape_is_finite_json(tmp_path: Path) -> None:
    steps = 25 * np.arange(1, 41)
    rng = np.random.default_rng(6)
    structure = np.abs(rng.standard_normal(40)).cumsum()
    loss = 2.0 - 0.1 * structure + 0.01 * rng.standard_normal(40)
    evals = {int(s): float(v) for s, v in zip(steps, loss, strict=True)}
    struct = {int(s): {**metrics_of(float(v)), "energy_rank_90": 4.0}  # constant: r undefined
              for s, v in zip(steps, structure, strict=True)}  # fmt: skip
    report = analyze(write_log(tmp_path / "run.jsonl", evals, struct), metrics=[*METRICS, "nope"])
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert set(d) >= {"cadence", "pairs", "forecast", "early_stop", "runs", "aggregate", "note"}
    assert set(d["cadence"]) >= {
        "matched",
        "structural_every",
        "eval_every",
        "unmatched_eval_steps",
    }
    pair = d["pairs"][0]
    assert set(pair) >= {
        "metric",
        "target",
        "n",
        "pearson_r",
        "spearman_r",
        "best_lag",
        "ccf",
        "granger",
    }
    assert pair["target"] == "eval_loss" and pair["n"] == 40
    assert set(pair["granger"]) >= {"structure_to_eval", "eval_to_structure", "reason"}
    assert len(pair["granger"]["structure_to_eval"]["p_values"]) == 3
    const = next(p for p in d["pairs"] if p["metric"] == "energy_rank_90")
    assert const["pearson_r"] is None and const["best_lag"] is None
    missing = next(p for p in d["pairs"] if p["metric"] == "nope")
    assert missing["n"] == 0 and "not in this log" in missing["lead_lag_reason"]
    assert d["forecast"]["nowcast"]["r2"] is not None and d["aggregate"] is None
    assert d["early_stop"]["rules"][0]["signal"] == "eval_loss"


def test_several_runs_are_aggregated(tmp_path: Path) -> None:
    logs = []
    for seed in range(3):
        steps, structure, loss = jump_process(seed=seed)
        logs.append(run_from(tmp_path / f"s{seed}.jsonl", steps, structure, loss))
    report = analyze(logs, metrics=["frobenius_norm", "sigma_max"])
    agg = report.aggregate
    assert agg is not None and agg.n_runs == 3
    rs = [p.pearson.r or 0.0 for r in report.runs for p in r.pairs if p.metric == "frobenius_norm"]
    frob = agg.metrics[0]
    assert frob.pearson_r_mean == pytest.approx(np.mean(rs))
    assert frob.pearson_r_sd == pytest.approx(np.std(rs, ddof=1))
    assert frob.best_lags == (0, 0, 0) and frob.lag_agreement == 1.0
    d = report.to_dict()
    assert len(d["pairs"]) == 6 and d["forecast"] is None and len(d["runs"]) == 3
    assert d["cadence"]["eval_steps"] == 144


def test_analysis_imports_only_numpy() -> None:
    code = ("import sys, gradience.analysis; "
            "print(sorted(m for m in ('scipy', 'statsmodels', 'pandas') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_dependency_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def fake(name: str, *args: Any) -> Any:
        return None if name == "scipy" else real(name, *args)  # the one statistics dependency left

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingDependencyError, match=r"pip install gradience\[analysis\]"):
        analyze(tmp_path / "any.jsonl")


# --------------------------------------------------------------------------- CLI


def gradience(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRADIENCE, *args], capture_output=True, text=True, timeout=120, check=False
    )


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and proc.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def mismatched_log(tmp_path: Path) -> Path:
    steps, structure, loss = jump_process()
    return run_from(tmp_path / "run.jsonl", steps, structure, loss, steps[steps % 50 == 0])


def test_cli_text_warns_loudly_on_a_cadence_mismatch(mismatched_log: Path) -> None:
    proc = gradience("analyze", str(mismatched_log), "--metrics", "frobenius_norm,sigma_max")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Cadence:" in out and "structural records every 50 steps" in out
    assert "WARNING: CADENCE MISMATCH: 24 of 48 eval steps" in out
    assert "granger p (s→e / e→s)" in out and "refused" in out
    assert "R²" in out and "Early stopping" in out
    assert out.rstrip().splitlines()[-1].startswith("Correlation is not prediction")


def test_cli_json_for_several_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (`main`) to spare a second interpreter importing statsmodels.
    logs = []
    for seed in range(2):
        steps, structure, loss = jump_process(seed=seed)
        logs.append(str(run_from(tmp_path / f"s{seed}.jsonl", steps, structure, loss)))
    assert main(["analyze", *logs, "--max-lag", "2", "--json"]) == 0

    def reject(token: str) -> None:
        raise AssertionError(f"non-finite number {token} in --json output")

    d = json.loads(capsys.readouterr().out, parse_constant=reject)
    assert d["cadence"]["matched"] is True and d["max_lag"] == 2
    assert d["aggregate"]["n_runs"] == 2 and len(d["pairs"]) == 8


def test_cli_in_process_text_for_several_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps, structure, loss = jump_process()
    logs = [str(run_from(tmp_path / f"s{i}.jsonl", steps, structure + i, loss)) for i in range(2)]
    assert main(["analyze", *logs, "--metrics", "frobenius_norm"]) == 0
    out = capsys.readouterr().out
    assert "Across 2 runs" in out and "WARNING" not in out and "0,0 (100.0%)" in out


def test_cli_errors(tmp_path: Path) -> None:
    one_error_line(gradience("analyze", str(tmp_path / "nope.jsonl")), 2, "run log not found")
    steps = 10 * np.arange(1, 11)
    no_eval = write_log(tmp_path / "a.jsonl", {}, {int(s): metrics_of(1.0) for s in steps})
    one_error_line(gradience("analyze", str(no_eval)), 1, "no eval records", "a.jsonl")
    no_struct = write_log(tmp_path / "b.jsonl", {int(s): 1.0 for s in steps}, {})
    one_error_line(gradience("analyze", str(no_struct)), 1, "no structural records")


def test_irregular_eval_grid_and_declared_interval_are_noted(tmp_path: Path) -> None:
    steps = np.r_[10 * np.arange(1, 9), 120, 130, 140, 150]
    n = steps.size
    log = run_from(tmp_path / "run.jsonl", steps, np.arange(n, dtype=float), np.linspace(1, 0, n),
                   interval=5)  # fmt: skip
    notes = analyze(log, metrics=["frobenius_norm"]).runs[0].notes
    assert any("irregular (1 gaps differ from 10 steps)" in note for note in notes)
    assert any("declares structural_interval=5" in note for note in notes)


# ----------------------------------------------- numpy statistics against scipy / statsmodels


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 60), st.integers(0, 2**31 - 1), st.floats(-0.99, 0.99), st.booleans())
def test_pearson_and_spearman_equal_scipy(n: int, seed: int, rho: float, ties: bool) -> None:
    from scipy import stats

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    y = rho * x + math.sqrt(1 - rho * rho) * rng.standard_normal(n)
    if ties:  # rounded values: tied ranks, the average-rank rule
        x, y = np.round(x, 1), np.round(y, 1)
    for ours, theirs in ((pearson, stats.pearsonr), (spearman, stats.spearmanr)):
        got = ours(x, y)
        if got.reason is not None:  # a constant series after rounding
            continue
        ref = theirs(x, y)
        assert got.r == pytest.approx(float(ref[0]), rel=1e-12, abs=1e-12)
        if math.isfinite(float(ref[1])):
            assert got.p == pytest.approx(float(ref[1]), rel=1e-9, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1), st.floats(0.0, 1.5), st.integers(0, 40))
def test_granger_equals_statsmodels_ssr_ftest(max_lag: int, seed: int, lead: float, extra: int) -> None:
    import warnings

    from statsmodels.tsa.stattools import grangercausalitytests

    rng = np.random.default_rng(seed)
    n = 3 * max_lag + 4 + extra
    cause = rng.standard_normal(n)
    effect = lead * np.r_[0.0, cause[:-1]] + rng.standard_normal(n)
    test, reason = granger_test(cause, effect, max_lag)
    assert test is not None, reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = grangercausalitytests(np.column_stack([effect, cause]), max_lag)
    for k in range(1, max_lag + 1):
        f_ref, p_ref = ref[k][0]["ssr_ftest"][:2]
        assert test.f_values[k - 1] == pytest.approx(f_ref, rel=1e-8)
        assert test.p_values[k - 1] == pytest.approx(p_ref, rel=1e-7, abs=1e-300)


def test_granger_with_a_constant_lag_column_says_so_as_statsmodels_does() -> None:
    cause = np.r_[np.zeros(12), np.arange(1.0, 9.0)]  # the first lags of cause are all zero
    effect = np.random.default_rng(0).standard_normal(20)
    test, reason = granger_test(cause[:14], effect[:14], 3)
    assert test is None and reason is not None and "constant values" in reason


def test_analyze_imports_neither_scipy_stats_nor_statsmodels() -> None:
    code = ("import sys, numpy as np; from gradience.analysis import granger, spearman, pearson; "
            "rng = np.random.default_rng(0); s = rng.standard_normal(50).cumsum(); e = s + rng.standard_normal(50); "
            "granger(s, e); spearman(s, e); pearson(s, e); "
            "print(sorted(m for m in sys.modules if m.startswith(('statsmodels', 'scipy.stats', 'pandas'))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
