"""Trigger-based eval: the pure decision on synthetic series, then one real tiny Trainer run."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradience.errors import UsageError
from gradience.integrations.trigger import (
    DIVERGENCE,
    FINAL,
    MAX_SPACING,
    NONFINITE,
    PLATEAU,
    REGIME_CHANGE,
    TRIGGER_KIND,
    TRIGGER_REASONS,
    TriggerPolicy,
    TriggerState,
    reference_evals,
)
from gradience.integrations.trigger_trainer import TrainerTrigger

# Roomy budget by default, so a test sees the trigger it is about and not the ceiling.
LOOSE = {"window": 5, "min_spacing": 1, "max_spacing": 1000}


def replay(series: list[float], policy: TriggerPolicy, last_step: int | None = None,
           sigma: list[float] | None = None) -> list[tuple[int, str]]:  # fmt: skip
    """(step, reason) of every eval the trigger asks for; one snapshot per step from step 1."""
    state = TriggerState(policy)
    fired = []
    for i, value in enumerate(series):
        step = i + 1
        metrics = {"frobenius_norm": value, "sigma_max": (sigma or series)[i]}
        state.observe(step, metrics)
        decision = state.decide(step, last_step)
        if decision.evaluate:
            fired.append((step, str(decision.reason)))
    return fired


def from_rates(rates: list[float], noise: float = 0.1, seed: int = 0) -> list[float]:
    """A norm series from its per-step rates of change, each off by ~`noise` of itself."""
    rng = np.random.default_rng(seed)
    r = np.asarray(rates, dtype=np.float64)
    return list(1.0 + np.cumsum(r * (1.0 + noise * rng.standard_normal(len(r)))))


def growing(n: int, seed: int = 0) -> list[float]:
    """Steady growth: one unit per step, with realistic step-to-step wobble."""
    return from_rates([1.0] * n, seed=seed)


def saturating(n: int) -> list[float]:
    """Growth that slows as exp(-step/10), the way a decaying learning rate makes it."""
    return from_rates([2.0 * math.exp(-t / 10) for t in range(n)])


# -- pure logic ----------------------------------------------------------------------------


def test_plateau_fires_once_when_the_norm_stops_moving() -> None:
    fired = replay(saturating(80), TriggerPolicy(**LOOSE))
    assert [r for _, r in fired] == [PLATEAU]
    assert 35 <= fired[0][0] <= 50  # the relative slope crosses 2e-3/step near step 40


def test_steady_growth_fires_nothing() -> None:
    for seed in range(5):
        assert replay(growing(100, seed), TriggerPolicy(**LOOSE)) == []


def test_divergence_fires_on_a_jump_of_the_rate() -> None:
    series = growing(30)
    series[25:] = [v + 20.0 for v in series[25:]]  # one step moves 21x the usual amount
    fired = replay(series, TriggerPolicy(**LOOSE))
    assert fired[0] == (26, DIVERGENCE)


def test_divergence_watches_sigma_max_too() -> None:
    series = growing(30)
    sigma = [v / 3 for v in series]
    sigma[25:] = [v * 4 for v in sigma[25:]]
    fired = replay(series, TriggerPolicy(**LOOSE), sigma=sigma)
    assert fired[0] == (26, DIVERGENCE)


def test_nan_fires_once_per_onset_and_stays_out_of_the_fits() -> None:
    series = growing(40)
    series[20:23] = [math.nan, math.inf, math.nan]
    fired = replay(series, TriggerPolicy(**LOOSE))
    assert fired == [(21, NONFINITE)]


def test_slope_sign_change_is_a_regime_change() -> None:
    # Turns from growing to shrinking in a few steps: too gradual for a jump, too fast for
    # the fitted slope to sit near zero (a plateau) on the way.
    series = from_rates([1.0] * 20 + [0.5, 0.0, -0.5] + [-1.0] * 15)
    fired = replay(series, TriggerPolicy(**LOOSE))
    assert fired == [(24, REGIME_CHANGE)]  # the first window whose fitted slope is negative


def test_moving_again_after_a_plateau_is_a_regime_change() -> None:
    rates = [2.0 * math.exp(-t / 10) for t in range(60)] + [0.05 * (t + 1) for t in range(20)]
    reasons = [r for _, r in replay(from_rates(rates), TriggerPolicy(**LOOSE))]
    assert reasons == [PLATEAU, REGIME_CHANGE]


def test_a_trigger_inside_min_spacing_waits_for_the_floor() -> None:
    series = saturating(80)
    plateau = replay(series, TriggerPolicy(**LOOSE))[0][0]
    state = TriggerState(TriggerPolicy(window=5, min_spacing=10, max_spacing=1000))
    state.evaluated(plateau - 4)  # someone evaluated 4 steps before it: the floor is 6 later
    decisions = []
    for step, value in enumerate(series, start=1):
        state.observe(step, {"frobenius_norm": value, "sigma_max": value})
        decisions.append(state.decide(step))
    fired = [d for d in decisions if d.evaluate]
    assert [(d.step, d.reason) for d in fired] == [(plateau + 6, PLATEAU)]
    assert fired[0].trigger is not None and fired[0].trigger.step == plateau  # detected then


def test_min_spacing_is_never_broken_except_by_final() -> None:
    rng = np.random.default_rng(3)
    series = list(np.cumsum(rng.standard_normal(200)) + 50.0)  # a random walk triggers a lot
    fired = replay(series, TriggerPolicy(window=4, min_spacing=7, max_spacing=30), last_step=200)
    steps = [s for s, _ in fired]
    assert len(steps) > 5
    assert all(b - a >= 7 for a, b in itertools.pairwise(steps[:-1]))
    assert all(b - a <= 30 for a, b in zip([0, *steps[:-1]], steps, strict=True))
    assert fired[-1] == (200, FINAL)


def test_max_spacing_forces_an_eval_when_nothing_fires() -> None:
    fired = replay(growing(100), TriggerPolicy(window=5, min_spacing=5, max_spacing=40))
    assert fired == [(40, MAX_SPACING), (80, MAX_SPACING)]


def test_final_step_always_evaluates() -> None:
    fired = replay(growing(33), TriggerPolicy(window=5, min_spacing=5, max_spacing=30), last_step=33)
    assert fired == [(30, MAX_SPACING), (33, FINAL)]


def test_same_series_same_decisions_and_reasons() -> None:
    rng = np.random.default_rng(7)
    series = list(np.cumsum(rng.standard_normal(150)) + 40.0)
    policy = TriggerPolicy(window=4, min_spacing=5, max_spacing=25)
    first, second = replay(series, policy, 150), replay(series, policy, 150)
    assert first == second
    assert {r for _, r in first} <= set(TRIGGER_REASONS)


def test_the_most_urgent_pending_trigger_names_the_eval() -> None:
    series = saturating(80)
    plateau = replay(series, TriggerPolicy(**LOOSE))[0][0]
    series[plateau + 1] = math.nan
    state = TriggerState(TriggerPolicy(window=5, min_spacing=plateau + 5, max_spacing=1000))
    for step, value in enumerate(series[: plateau + 2], start=1):
        state.observe(step, {"frobenius_norm": value, "sigma_max": value})
        assert not state.decide(step).evaluate
    decision = state.decide(plateau + 5)
    assert (decision.reason, decision.also) == (NONFINITE, (PLATEAU,))


def test_an_eval_someone_else_ran_answers_pending_triggers() -> None:
    series = saturating(80)
    plateau = replay(series, TriggerPolicy(**LOOSE))[0][0]
    state = TriggerState(TriggerPolicy(window=5, min_spacing=10, max_spacing=1000))
    state.evaluated(plateau - 4)
    for step, value in enumerate(series[: plateau + 1], start=1):
        state.observe(step, {"frobenius_norm": value, "sigma_max": value})
        state.decide(step)
    state.evaluated(plateau + 1)  # after the plateau was detected: it is answered
    assert not any(state.decide(s).evaluate for s in range(plateau + 2, 200))


def test_snapshots_without_the_metric_are_ignored() -> None:
    state = TriggerState(TriggerPolicy(**LOOSE))
    assert state.observe(1, {"stable_rank": 2.0}) == []
    assert state.observe(2, {"frobenius_norm": 1.0}) == []  # sigma_max missing: still used


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"window": 2}, "window"), ({"min_spacing": 0}, "min_spacing"),
     ({"min_spacing": 10, "max_spacing": 5}, "max_spacing"), ({"plateau_rel_slope": 0}, "plateau_rel_slope"),
     ({"z_threshold": math.nan}, "z_threshold"), ({"reference_eval_every": -1}, "reference_eval_every")],
)  # fmt: skip
def test_bad_policies_fail_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(UsageError, match=f"`{field}`"):
        TriggerPolicy(**kwargs)


def test_reference_schedule_counts_a_final_off_grid_eval() -> None:
    assert [reference_evals(n, 10) for n in (0, 9, 10, 11, 120)] == [0, 1, 1, 2, 12]


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class _Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, int | None, dict[str, Any]]] = []

    def write(self, event: str, step: int | None, **fields: Any) -> None:
        self.records.append((event, step, fields))


def test_trainer_glue_counts_evals_seconds_and_savings() -> None:
    glue = TrainerTrigger(TriggerPolicy(window=5, min_spacing=5, max_spacing=20))
    # The user configured eval every 10 steps: the trigger replaces that schedule, silently,
    # and its savings are counted against it (not against its own min_spacing of 5).
    assert glue.begin(_Obj(eval_strategy="steps", eval_steps=10)) is None and glue.override
    log, evals = _Log(), []
    for step in range(1, 51):
        state, control = _Obj(global_step=step, max_steps=50), _Obj(should_evaluate=True)
        glue.step_end(state, control, log)
        glue.observe(step, "interval", {"frobenius_norm": float(step), "sigma_max": 1.0 + step})
        glue.step_end(state, control, log)
        if control.should_evaluate:  # what the Trainer would do: one eval, two splits
            evals.append(step)
            glue.evaluated(step, 1.5)
            glue.evaluated(step, 0.5)
    assert evals == [20, 40, 50]  # the Trainer's every-step schedule is overridden
    assert [(f["reason"], s) for _, s, f in log.records] == [(MAX_SPACING, 20), (MAX_SPACING, 40), (FINAL, 50)]
    summary = glue.summary(50)
    assert {k: summary[k] for k in ("evals_run", "eval_seconds", "mean_eval_seconds", "reference_eval_every",
                                    "reference_source", "reference_evals", "evals_saved", "eval_seconds_saved")} == {
        "evals_run": 3, "eval_seconds": 6.0, "mean_eval_seconds": 2.0, "reference_eval_every": 10,
        "reference_source": "eval_steps", "reference_evals": 5, "evals_saved": 2, "eval_seconds_saved": 4.0}  # fmt: skip
    assert summary["by_reason"] == {MAX_SPACING: 2, FINAL: 1}


@pytest.mark.parametrize(("args", "policy", "expected"), [
    ({"eval_strategy": "steps", "eval_steps": 10}, {}, (10, "eval_steps", 5)),
    ({"eval_strategy": "steps", "eval_steps": 0.25}, {}, (13, "eval_steps", 4)),  # a fraction of max_steps
    ({"eval_strategy": "no"}, {}, (5, "min_spacing", 10)),  # nothing configured: the trigger's floor
    ({"eval_strategy": "steps", "eval_steps": 10}, {"reference_eval_every": 25}, (25, "reference_eval_every", 2)),
])  # fmt: skip
def test_savings_are_counted_against_the_configured_schedule(
    args: dict[str, Any], policy: dict[str, Any], expected: tuple[int, str, int]
) -> None:
    glue = TrainerTrigger(TriggerPolicy(window=5, min_spacing=5, max_spacing=20, **policy))
    glue.begin(_Obj(**args), _Obj(global_step=0, max_steps=50))
    summary = glue.summary(50)
    assert (summary["reference_eval_every"], summary["reference_source"], summary["reference_evals"]) == expected
    assert summary["reference_evals"] == reference_evals(50, expected[0])


def test_epoch_schedule_is_overridden_with_a_warning() -> None:
    glue = TrainerTrigger(TriggerPolicy())
    note = glue.begin(_Obj(eval_strategy="epoch"))
    assert note is not None and "eval_strategy='epoch'" in note and glue.override


def test_another_rank_s_trigger_makes_this_rank_evaluate_too() -> None:
    glue = TrainerTrigger(TriggerPolicy(window=5, min_spacing=5, max_spacing=20), agree=lambda flag: True)
    glue.begin(_Obj(eval_strategy="no"))
    control = _Obj(should_evaluate=False)
    glue.step_end(_Obj(global_step=7, max_steps=50), control, _Log())
    assert control.should_evaluate and glue.state.last_eval_step == 7


# -- a real Trainer run --------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from gradience.telemetry import iter_records, validate_record  # noqa: E402
from gradience_hf import GradienceCallback  # noqa: E402
from tests.tiny_trainer import tiny_trainer  # noqa: E402

POLICY = TriggerPolicy(window=3, min_spacing=3, max_spacing=7)


def _run(tmp: Path, eval_strategy: str, extra: list[Any] | None = None) -> tuple[list[dict[str, Any]], list[Any]]:
    cb = GradienceCallback(tmp / "log", structural_interval=1, eval_policy="trigger", trigger=POLICY)
    # Every step on the Trainer's own schedule, so an override that fails would show.
    schedule = {"eval_strategy": eval_strategy} | ({"eval_steps": 1} if eval_strategy == "steps" else {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp, [*(extra or []), cb], max_steps=20, **schedule).train()
    records = [r.data for r in iter_records(tmp / "log" / "run.jsonl", strict=True)]
    for record in records:
        assert validate_record(record) == [], record
    return records, [w for w in caught if "eval_policy='trigger'" in str(w.message)]


def _triggers(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in records if r["event"] == "metrics" and r.get("kind") == TRIGGER_KIND}


def test_trainer_evaluates_only_at_trigger_steps(tmp_path: Path) -> None:
    records, overridden = _run(tmp_path, "steps")
    assert overridden == []  # eval_strategy="steps" is the reference schedule the trigger replaces
    triggers = _triggers(records)
    eval_steps = sorted({r["step"] for r in records if r["event"] == "eval"})
    assert eval_steps == sorted(triggers) and eval_steps[-1] == 20
    assert all(r["reason"] in TRIGGER_REASONS and r["detail"] for r in triggers.values())
    assert triggers[20]["reason"] == FINAL
    gaps = np.diff([0, *eval_steps[:-1]])
    assert gaps.min() >= POLICY.min_spacing and np.diff([0, *eval_steps]).max() <= POLICY.max_spacing
    structural = {r["step"]: r["reason"] for r in records if r.get("kind") == "structural"}
    assert all(s in structural for s in eval_steps)  # every eval has its snapshot at its step

    end = records[-1]
    assert end["event"] == "run_end" and end["status"] == "ok"
    savings = end["eval_savings"]
    assert savings["evals_run"] == len(eval_steps) == savings["triggered"]
    # Against the configured schedule (eval every step), not the trigger's min_spacing (3).
    assert (savings["reference_eval_every"], savings["reference_source"]) == (1, "eval_steps")
    assert savings["reference_evals"] == reference_evals(20, 1) == 20
    assert savings["eval_seconds"] > 0
    expected = (savings["reference_evals"] - savings["evals_run"]) * savings["eval_seconds"] / savings["evals_run"]
    # Both figures are logged rounded to 1 ms: the rounding of eval_seconds is scaled up by the ratio.
    ratio = (savings["reference_evals"] - savings["evals_run"]) / savings["evals_run"]
    assert savings["eval_seconds_saved"] == pytest.approx(expected, abs=(ratio + 1) * 5e-4 + 1e-9)
    assert records[0]["eval_trigger"]["min_spacing"] == 3


def test_with_eval_strategy_no_nothing_is_suppressed(tmp_path: Path) -> None:
    class AskAtFour(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 4:
                control.should_evaluate = True

    records, overridden = _run(tmp_path, "no", extra=[AskAtFour()])
    assert overridden == []
    eval_steps = sorted({r["step"] for r in records if r["event"] == "eval"})
    assert 4 in eval_steps and 4 not in _triggers(records)  # the user's eval ran, untriggered
    assert set(eval_steps) - {4} == set(_triggers(records))
    assert records[-1]["eval_savings"]["evals_run"] == len(eval_steps)


def test_trigger_misconfiguration_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="structural_interval"):
        GradienceCallback(tmp_path, structural_interval=0, eval_policy="trigger")
    with pytest.raises(UsageError, match="TriggerPolicy"):
        GradienceCallback(tmp_path, trigger=TriggerPolicy())
    with pytest.raises(UsageError, match="eval_policy"):
        GradienceCallback(tmp_path, eval_policy="sometimes")


# -- eval RNG isolation ------------------------------------------------------------------------


def test_rng_guard_restores_only_the_step_it_saved() -> None:
    from gradience.integrations.eval_rng import EvalRngGuard

    guard = EvalRngGuard()
    guard.save(5)
    expected = torch.rand(3)
    guard.restore(5)  # an eval split at step 5 ran: the stream is put back
    assert torch.equal(torch.rand(3), expected)
    after = torch.get_rng_state()
    guard.restore(6)  # nothing saved at step 6: never rewind to an older state
    assert torch.equal(torch.get_rng_state(), after)


class _RngProbe(transformers.TrainerCallback):  # type: ignore[misc]
    """The torch RNG state as each step begins: what dropout and batch order will draw from."""

    def __init__(self) -> None:
        self.states: list[bytes] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.states.append(torch.get_rng_state().numpy().tobytes())


@pytest.mark.parametrize("isolate", [True, False])
def test_evals_do_not_move_the_training_rng(tmp_path: Path, isolate: bool) -> None:
    """With isolation (the default) a run that evaluates every 2 steps draws the same random
    numbers for training as one that never evaluates; without it, every eval shifts them."""
    probes = []
    for name, schedule in (("never", {"eval_strategy": "no"}), ("often", {"eval_strategy": "steps", "eval_steps": 2})):
        probe = _RngProbe()
        cb = GradienceCallback(tmp_path / name, structural_interval=2, isolate_eval_rng=isolate)
        tiny_trainer(tmp_path / name, [cb, probe], max_steps=6, **schedule).train()
        probes.append(probe.states)
    assert len(probes[0]) == len(probes[1]) == 6
    assert (probes[0] == probes[1]) is isolate
