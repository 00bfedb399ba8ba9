"""Tests for gradience.runlog.monitor: run summaries from logs built with `RunWriter`."""

from __future__ import annotations

import json
import math
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gradience.errors import TelemetryError, UsageError
from gradience.runlog.monitor import monitor
from gradience.runlog.monitor_report import (
    GAP_THRESHOLD,
    MAX_KEPT,
    OVERPROVISION_THRESHOLD,
    STRUCTURAL_KEYS,
    MonitorReport,
    trend,
)
from gradience.telemetry import RunWriter, append_record_atomic

LORA = {
    "r": 8, "lora_alpha": 16, "use_rslora": False, "use_dora": False,
    "target_modules": ["query", "value"], "rank_pattern": {}, "alpha_pattern": {},
    "lora_dropout": 0.1,
}  # fmt: skip
RUN_START: dict[str, Any] = {
    "model": {"name": "tiny-bert", "n_params": 22_700_000, "trainable_params": 300_000},
    "dataset": {"name": "rotten_tomatoes", "n_train": 800, "n_test": 200},
    "task_profile": "easy_classification",
    "lora": LORA,
    "training_args": {
        "learning_rate": 2e-4, "max_steps": 100, "output_dir": "runs/toy",
        "per_device_train_batch_size": 16,
    },
    "versions": {"gradience": "0.1.0", "transformers": "4.46.0"},
    "structural_interval": 20,
    "eval_policy": "fixed",
}
MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
Span = tuple[float, float]


def lin(span: Span, step: int, steps: int) -> float:
    """Linear from span[0] at step 0 to span[1] at `steps`."""
    return span[0] + (span[1] - span[0]) * step / steps


def write_run(
    path: Path,
    *,
    steps: int = 100,
    every: int = 20,
    train_loss: Span = (0.7, 0.3),
    eval_train: Span = (0.6, 0.35),
    eval_test: Span = (0.65, 0.45),
    train_acc: Span = (0.6, 0.85),
    test_acc: Span = (0.55, 0.8),
    utilization: Span = (0.5, 0.5),
    energy_rank: float = 2.5,
    status: str | None = "ok",
    start: dict[str, Any] | None = RUN_START,
    train: bool = True,
    structural: bool = True,
    test_extra: dict[str, Any] | None = None,
    hook: Callable[[RunWriter, int], None] | None = None,
) -> Path:
    """A synthetic run: train_step every step, evals and structural snapshots every `every`."""
    with RunWriter(path, run_id="run-1", clock=lambda: 1_767_225_600.0) as w:
        if start is not None:
            w.write("run_start", step=0, **start)
        for s in range(1, steps + 1):
            if train:
                w.write("train_step", step=s, loss=lin(train_loss, s, steps), lr=2e-4,
                        grad_norm=1.5, epoch=s / 50, lora_grad_norm=0.4)  # fmt: skip
            if hook is not None:
                hook(w, s)
            if s % every:
                continue
            w.write("eval", step=s, split="train",
                    metrics={"loss": lin(eval_train, s, steps), "accuracy": lin(train_acc, s, steps)})  # fmt: skip
            w.write("eval", step=s, split="test",
                    metrics={"loss": lin(eval_test, s, steps), "accuracy": lin(test_acc, s, steps),
                             **(test_extra or {})})  # fmt: skip
            if structural:
                u = lin(utilization, s, steps)
                agg = {"frobenius_norm": 0.01 * s, "sigma_max": 0.005 * s, "stable_rank": 8 * u,
                       "energy_rank_90": energy_rank, "utilization": u}  # fmt: skip
                w.write("metrics", step=s, kind="structural", reason="eval", metrics=agg,
                        modules={m: agg for m in MODULES}, cost_ms=3.0)  # fmt: skip
        if status is not None:
            w.write("run_end", step=steps, status=status)
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "toy" / "run.jsonl"


def codes(report: MonitorReport, source: str = "monitor") -> list[str]:
    return [r.code for r in report.recommendations if r.source == source]


def rec_of(report: MonitorReport, code: str) -> Any:
    return next(r for r in report.recommendations if r.code == code)


def assert_json_safe(report: MonitorReport) -> dict[str, Any]:
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    return data


# --- a healthy run --------------------------------------------------------------------------


def test_healthy_run_tells_the_whole_story(log: Path) -> None:
    report = monitor(write_run(log))
    assert (report.run_id, report.status, report.status_note) == ("run-1", "ok", "run_end at step 100")
    assert report.n_records == 1 + 100 + 5 * 3 + 1 and report.last_step == 100
    run = report.run
    assert run["model"] == RUN_START["model"] and run["dataset"] == RUN_START["dataset"]
    assert run["task_profile"] == "easy_classification" and run["lora"] == LORA
    assert run["versions"] == RUN_START["versions"]
    # Only the known training-arg keys are kept (output_dir is not among them).
    assert run["training_args"] == {"learning_rate": 2e-4, "max_steps": 100,
                                    "per_device_train_batch_size": 16}  # fmt: skip
    assert (run["structural_interval"], run["eval_policy"]) == (20, "fixed")
    t = report.train
    assert (t.n_steps, t.first_step, t.last_step) == (100, 1, 100)
    assert t.latest == pytest.approx({"loss": 0.3, "lr": 2e-4, "grad_norm": 1.5,
                                      "lora_grad_norm": 0.4, "epoch": 2.0})  # fmt: skip
    assert (t.min_loss, t.min_loss_step) == (pytest.approx(0.3), 100)
    assert t.loss_trend is not None and t.loss_trend.label == "falling"
    assert t.loss_trend.n_points == 20 and t.loss_trend.first_step == 81
    assert t.loss_trend.slope_per_100_steps == pytest.approx(-0.4)

    sig = report.signals
    assert sig.train_ppl == pytest.approx(math.exp(0.35)) and sig.train_ppl_source == "eval:train"
    assert sig.test_ppl == pytest.approx(math.exp(0.45)) and sig.test_split == "test"
    assert sig.gap == pytest.approx(math.exp(0.10))
    assert (sig.train_accuracy, sig.test_accuracy) == (pytest.approx(0.85), pytest.approx(0.8))
    assert (sig.best_test_loss, sig.best_test_loss_step) == (pytest.approx(0.45), 100)
    assert report.evals["test"].n_evals == 5 and report.evals["test"].ppl_source == "exp(loss)"

    st = report.structural
    assert st is not None and st.n_snapshots == 5 and st.n_modules == 2
    assert st.latest.step == 100 and st.latest.metrics["utilization"] == pytest.approx(0.5)
    assert [sn.step for sn in st.window] == [20, 40, 60, 80, 100] and st.cost_ms_median == st.cost_ms_p95 == 3.0
    labels = {tr.metric: tr.label for tr in st.trends}
    assert labels == {"frobenius_norm": "rising", "sigma_max": "rising", "stable_rank": "flat",
                      "energy_rank_90": "flat", "utilization": "flat"}  # fmt: skip

    assert report.recommendations == () and report.missing == () and report.read_problems == ()
    assert "hypotheses" in report.recommendation_note and "not predictions" in report.recommendation_note
    assert report.thresholds["gap"] == GAP_THRESHOLD
    assert report.alerts.total == 0 and report.nonfinite.records == 0 and report.audit is None
    data = assert_json_safe(report)
    assert data["signals"]["gap"] == pytest.approx(math.exp(0.10))
    assert set(data) >= {"run", "train", "evals", "signals", "structural", "recommendations"}


def test_logged_ppl_wins_over_exp_loss(log: Path) -> None:
    report = monitor(write_run(log, test_extra={"ppl": 9.0}))
    assert report.evals["test"].ppl == 9.0 and report.evals["test"].ppl_source == "logged"
    assert report.signals.gap == pytest.approx(9.0 / math.exp(0.35))


# --- monitor recommendations ----------------------------------------------------------------


def test_overfitting_run_is_probably_memorizing(log: Path) -> None:
    report = monitor(write_run(log, eval_train=(0.5, 0.05), eval_test=(0.6, 1.0)))
    gap = math.exp(1.0) / math.exp(0.05)
    assert report.signals.gap == pytest.approx(gap) and gap > GAP_THRESHOLD
    rec = rec_of(report, "memorizing")
    assert (rec.threshold, rec.value, rec.source) == (1.5, pytest.approx(gap), "monitor")
    assert "probably memorizing" in rec.message and "1.5x" in rec.rule
    # The test loss was best at the first eval and only rose after it.
    assert (report.signals.best_test_loss, report.signals.best_test_loss_step) == (
        pytest.approx(0.68), 20)  # fmt: skip


def test_gap_just_under_the_threshold_is_quiet(log: Path) -> None:
    report = monitor(write_run(log, eval_train=(0.5, 0.3), eval_test=(0.6, 0.3 + math.log(1.45))))
    assert report.signals.gap == pytest.approx(1.45)
    assert "memorizing" not in codes(report)


def test_no_chance_level_without_a_label_count(log: Path) -> None:
    # Issue 10, finding 3: 45% exact match was judged against an assumed binary chance level.
    report = monitor(write_run(log, test_acc=(0.4, 0.45)))
    assert report.signals.chance is None and "near_chance" not in codes(report)


def test_chance_for_a_binary_classifier(log: Path) -> None:
    start = {**RUN_START, "task": {"kind": "classification", "peft_task_type": "SEQ_CLS", "num_labels": 2}}
    report = monitor(write_run(log, start=start, test_acc=(0.5, 0.52)))
    chance = report.signals.chance
    assert chance is not None and (chance.rate, chance.basis) == (0.5, "num_labels")
    rec = rec_of(report, "near_chance")
    assert rec.threshold == pytest.approx(0.55) and rec.value == pytest.approx(0.52)
    assert "fix the task set-up first" in rec.message and "num_labels=2" in rec.message


def test_causal_lm_accuracy_has_no_chance_level(log: Path) -> None:
    start = {**RUN_START, "task": {"kind": "causal_lm", "peft_task_type": "CAUSAL_LM"},
             "dataset": {"name": "sums", "num_labels": 2}}  # a stray label count does not make it a classifier
    report = monitor(write_run(log, start=start, test_acc=(0.4, 0.45), test_extra={"exact_match": 0.45}))
    sig = report.signals
    assert sig.chance is None and sig.task_kind == "causal_lm" and "near_chance" not in codes(report)
    assert sig.test_exact_match == pytest.approx(0.45) and sig.test_loss == pytest.approx(0.45)


def test_chance_from_num_labels(log: Path) -> None:
    start = {**RUN_START, "dataset": {**RUN_START["dataset"], "num_labels": 4}}
    report = monitor(write_run(log, start=start, test_acc=(0.3, 0.52)))
    chance = report.signals.chance
    assert chance is not None and (chance.rate, chance.basis) == (0.25, "num_labels")
    assert "near_chance" not in codes(report)  # 52% is far above 25%
    report = monitor(write_run(log.with_name("b.jsonl"), start=start, test_acc=(0.3, 0.29)))
    assert rec_of(report, "near_chance").threshold == pytest.approx(0.30)


def test_chance_from_logged_majority_rate(log: Path) -> None:
    start = {**RUN_START, "dataset": {**RUN_START["dataset"], "num_labels": 2}}
    report = monitor(write_run(log, start=start, test_acc=(0.6, 0.72), test_extra={"majority_rate": 0.7}))
    chance = report.signals.chance
    assert chance is not None and (chance.rate, chance.basis) == (0.7, "majority_rate")
    rec = rec_of(report, "near_chance")
    assert rec.value == pytest.approx(0.72) and rec.threshold == pytest.approx(0.75)


def test_low_energy_rank_is_over_provisioned(log: Path) -> None:
    report = monitor(write_run(log, energy_rank=1.5))  # r = 8: 1.5 / 8 < 25%
    rec = rec_of(report, "rank_overprovisioned")
    assert (rec.threshold, rec.value) == (OVERPROVISION_THRESHOLD, pytest.approx(1.5 / 8))
    assert "--rank 2" in rec.message and "gradience compress" in rec.message
    assert rec.rule == "mean energy_rank_90 / r < 25%"


def test_low_stable_rank_alone_does_not_fire(log: Path) -> None:
    # Issue 10, finding 8: stable rank 1-3 at r >= 8 is typical of LLM runs; the old
    # utilization rule fired on nearly every one. Energy spread over 4 of 8 directions: quiet.
    report = monitor(write_run(log, utilization=(0.15, 0.15), energy_rank=4.0))
    assert "rank_overprovisioned" not in codes(report)


def test_structural_trend_slope_and_relative_change(log: Path) -> None:
    report = monitor(write_run(log, utilization=(0.2, 0.4)))
    assert report.structural is not None
    util = next(t for t in report.structural.trends if t.metric == "utilization")
    # Points 0.24..0.40 at steps 20..100: slope 0.2 per 100 steps; fitted 0.24 -> 0.40 is +66.7%.
    assert util.slope_per_100_steps == pytest.approx(0.2)
    assert util.relative_change == pytest.approx(0.16 / 0.24) and util.label == "rising"
    assert "utilization" not in codes(report)


def test_only_the_last_snapshots_are_kept(log: Path) -> None:
    report = monitor(write_run(log, steps=70, every=10))
    assert report.structural is not None and report.structural.n_snapshots == 7
    assert [sn.step for sn in report.structural.window] == [30, 40, 50, 60, 70]
    assert all(t.first_step == 30 and t.n_points == 5 for t in report.structural.trends)


# --- partial and damaged logs ---------------------------------------------------------------


def test_crashed_run_without_run_end(log: Path) -> None:
    write_run(log, status=None)
    with open(log, "ab") as fh:
        fh.write(b'{"schema":"gradience.run/1","ts":1.0,"run_id":"run-1","seq":')
    report = monitor(log)
    assert report.status == "incomplete"
    assert "still running or crashed" in report.status_note and "100" in report.status_note
    assert any(m.startswith("run_end") for m in report.missing)
    n_lines = len(log.read_bytes().splitlines())
    assert report.skipped_lines == 1
    assert report.read_problems == (
        f"line {n_lines}: torn last line (no trailing newline) (Expecting value); skipped",
    )


def test_eval_only_run(log: Path) -> None:
    report = monitor(write_run(log, train=False, structural=False, status=None))
    assert report.train.n_steps == 0 and report.train.loss_trend is None
    assert report.train.latest == dict.fromkeys(("loss", "lr", "grad_norm", "lora_grad_norm", "epoch"))
    assert report.signals.gap == pytest.approx(math.exp(0.10))
    assert report.structural is None
    missing = " | ".join(report.missing)
    for part in ("train_step", "structural metrics", "run_end"):
        assert part in missing
    assert_json_safe(report)


def test_log_without_run_start_or_train_eval(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    with RunWriter(log) as w:
        for s in range(1, 11):
            w.write("train_step", step=s, loss=1.0 - 0.05 * s)
        w.write("eval", step=10, split="validation", metrics={"loss": 0.9})
    report = monitor(log)
    assert report.run["model"] is None and report.run["training_args"] == {}
    sig = report.signals
    assert sig.test_split == "validation" and sig.train_ppl_source == "train_step"
    assert sig.gap == pytest.approx(math.exp(0.9) / math.exp(0.5))
    assert sig.chance is None  # no accuracy logged
    assert any(m.startswith("run_start") for m in report.missing)
    assert any(m.startswith("train-split eval") for m in report.missing)


def test_malformed_lines_are_reported_with_line_numbers(log: Path) -> None:
    write_run(log)
    lines = log.read_bytes().splitlines(keepends=True)
    clean = monitor(log)
    for at, bad in ((2, b"not json\n"), (5, b"[1, 2]\n"), (8, b'{"foo": 1}\n'), (11, b"{oops\n")):
        lines.insert(at, bad)  # lands on line at+1
    log.write_bytes(b"".join(lines))
    report = monitor(log)
    assert report.n_records == clean.n_records and report.signals == clean.signals
    assert report.skipped_lines == 4
    assert len(report.read_problems) == 3  # one summary line per kind of problem
    joined = "\n".join(report.read_problems)
    assert "2 lines skipped: malformed JSON" in joined and "lines 3, 12" in joined
    assert "line 6: not a JSON object (list); skipped" in joined
    assert "line 9: missing envelope field `schema`; skipped" in joined


def test_nan_values_are_surfaced(log: Path) -> None:
    def nan_hook(w: RunWriter, s: int) -> None:
        if s in (50, 60):
            w.write("train_step", step=s, loss=float("nan"), grad_norm=float("inf"))

    write_run(log, hook=nan_hook, status=None)
    with RunWriter(log, resume=True) as w:
        w.write("eval", step=101, split="test", metrics={"loss": float("nan"), "accuracy": 0.8})
        w.write("run_end", step=101, status="error")
    report = monitor(log)
    nf = report.nonfinite
    assert (nf.records, nf.first_step, nf.last_step) == (3, 50, 101)
    assert nf.by_path == {"train_step:loss": 2, "train_step:grad_norm": 2, "eval:metrics.loss": 1}
    rec = rec_of(report, "nonfinite_values")
    assert rec.value == 3 and "NaN/Inf" in rec.message and "step 50" in rec.message
    assert report.train.latest["loss"] == pytest.approx(0.3)  # the latest finite loss
    # The latest test eval has a null loss: no test ppl, so no gap, and nothing crashes.
    assert report.evals["test"].loss is None and report.signals.gap is None
    assert report.signals.best_test_loss == pytest.approx(0.45)
    assert_json_safe(report)


def test_out_of_range_number_in_a_hand_edited_log_stays_json_safe(log: Path) -> None:
    write_run(log, steps=20)
    text = log.read_text().replace('"stable_rank":4.0', '"stable_rank":1e999', 1)
    log.write_text(text)
    report = monitor(log)
    assert report.structural is not None and report.structural.latest.metrics["stable_rank"] is None
    assert_json_safe(report)


def test_appended_lora_audit(log: Path) -> None:
    write_run(log, structural=False)
    metrics = {"lora_params": 294912, "n_modules": 24, "n_layers": 12, "stable_rank_mean": 1.47,
               "utilization_mean": 0.184, "energy_rank_p50": 1.5, "energy_rank_p90": 6,
               "frobenius_norm": 3.2, "sigma_max": 1.1}  # fmt: skip
    suggestion = {"energy_fraction": 0.9, "uniform_median": 4, "uniform_p90": 8}
    append_record_atomic(log, "metrics", kind="lora_audit", peft_dir="runs/toy/peft",
                         metrics=metrics, suggestion=suggestion)  # fmt: skip
    report = monitor(log)
    assert report.audit is not None
    assert (report.audit.peft_dir, report.audit.metrics, report.audit.suggestion) == (
        "runs/toy/peft", metrics, suggestion)  # fmt: skip
    assert report.status == "ok"  # an audit after run_end does not reopen the run
    rec = rec_of(report, "rank_overprovisioned")  # the audit's median energy rank 1.5 of r = 8
    assert rec.value == pytest.approx(1.5 / 8) and "appended audit" in rec.message


def test_alerts_and_recorded_recommendations(log: Path) -> None:
    def hook(w: RunWriter, s: int) -> None:
        if s <= 60:
            code = "loss_spike" if s % 3 else "grad_explosion"
            w.write("alert", step=s, severity="warning", code=code, message=f"alert at {s}")
        if s in (30, 90):
            w.write("recommendation", step=s, code="reduce_rank", message=f"try r=4 ({s})",
                    threshold=0.9, value=0.93)  # fmt: skip

    report = monitor(write_run(log, hook=hook))
    al = report.alerts
    assert al.total == 60 and al.by_code == {"loss_spike": 40, "grad_explosion": 20}
    assert al.by_severity == {"warning": 60}
    assert len(al.latest) == MAX_KEPT and al.latest[-1].message == "alert at 60"
    rec = rec_of(report, "reduce_rank")
    assert (rec.source, rec.step, rec.message) == ("log", 90, "try r=4 (90)")
    assert (rec.threshold, rec.value) == (0.9, 0.93) and "2 times" in rec.rule


def test_status_follows_run_end_and_resume(log: Path) -> None:
    write_run(log, steps=20, status="error")
    assert monitor(log).status == "error"
    with RunWriter(log, resume=True) as w:
        w.write("run_resume", step=20, resumed_from="checkpoint-20")
        w.write("train_step", step=21, loss=0.5)
    report = monitor(log)
    assert (report.status, report.n_resumes, report.last_step) == ("incomplete", 1, 21)
    with RunWriter(log, resume=True) as w:
        w.write("run_end", step=21, status="aborted")
    assert monitor(log).status == "aborted"


# --- errors ---------------------------------------------------------------------------------


def test_missing_log_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="run log not found"):
        monitor(tmp_path / "nope.jsonl")


def test_empty_log_is_a_telemetry_error(tmp_path: Path) -> None:
    (tmp_path / "run.jsonl").write_bytes(b"")
    with pytest.raises(TelemetryError, match="empty"):
        monitor(tmp_path / "run.jsonl")


def test_log_without_a_valid_record_is_a_telemetry_error(tmp_path: Path) -> None:
    (tmp_path / "run.jsonl").write_bytes(b"garbage\n[1]\n")
    with pytest.raises(TelemetryError, match="no valid record") as info:
        monitor(tmp_path / "run.jsonl")
    assert "line 1" in str(info.value) and "\n" not in str(info.value)


# --- trend ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "label"),
    [((1.0, 1.2, 1.4), "rising"), ((1.0, 0.8, 0.6), "falling"), ((1.0, 1.01, 1.02), "flat")],
)
def test_trend_labels(values: tuple[float, ...], label: str) -> None:
    t = trend("x", list(zip((0, 100, 200), values, strict=True)))
    assert t.label == label and t.threshold == 0.05 and t.n_points == 3


def test_trend_numbers_and_degenerate_windows() -> None:
    t = trend("x", [(0, 1.0), (100, 2.0), (200, 3.0)])
    assert t.slope_per_100_steps == pytest.approx(1.0) and t.relative_change == pytest.approx(2.0)
    assert trend("x", [(5, 1.0)]).label == "n/a"
    assert trend("x", [(5, 1.0), (5, 2.0)]).label == "n/a"
    assert trend("x", [(0, None), (10, 1.0)]).n_points == 1
    zero = trend("x", [(0, 0.0), (10, 0.0)])
    assert (zero.label, zero.relative_change) == ("flat", 0.0)


# --- streaming ------------------------------------------------------------------------------


def test_streams_a_large_log_in_bounded_memory(tmp_path: Path) -> None:
    """200,000 records summarised with a peak of well under a few MB (no list of records)."""
    # One cycle of 50 records, shaped like a real log: mostly train_step lines.
    template = write_run(tmp_path / "template.jsonl", steps=46, every=46, status=None,
                         hook=lambda w, s: w.write("alert", step=s, severity="info",
                                                   code=f"c{s % 7}", message="m") if s == 1 else None)  # fmt: skip
    start, *cycle = (json.loads(line) for line in template.read_text().splitlines())
    assert len(cycle) == 50
    log = tmp_path / "big.jsonl"
    n = 200_000
    with open(log, "w") as fh:
        fh.write(json.dumps(start) + "\n")
        for seq in range(1, n):
            rec = cycle[(seq - 1) % len(cycle)]
            rec["seq"], rec["step"] = seq, seq
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
    tracemalloc.start()
    try:
        report = monitor(log)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.n_records == n and report.last_step == n - 1
    expected = Counter(cycle[i % len(cycle)]["event"] for i in range(n - 1))
    assert report.train.n_steps == expected["train_step"]
    assert report.structural is not None and report.structural.n_snapshots == expected["metrics"]
    assert len(report.structural.window) == 5 and len(report.alerts.latest) == MAX_KEPT
    assert report.alerts.total == expected["alert"]
    assert peak < 1_000_000, f"peak {peak / 1e6:.1f} MB"
    assert set(STRUCTURAL_KEYS) == set(report.structural.latest.metrics)


def test_trend_is_the_change_between_the_fitted_ends_and_bounded() -> None:
    # Issue 10, finding 6: a loss that fell 67% read "-121.9%" (fitted change / window mean).
    losses = [3.0, 2.6, 2.2, 1.8, 1.4, 1.0]
    t = trend("loss", list(zip(range(10, 70, 10), losses, strict=True)))
    assert t.relative_change == pytest.approx(-2 / 3) and t.label == "falling"
    noisy = trend("loss", [(0, 3.0), (10, 0.2), (20, 0.1), (30, 0.05)])  # the line dips below 0
    assert noisy.relative_change is not None and -1.0 < noisy.relative_change < 0


def test_snapshot_cost_median_and_p95(log: Path) -> None:
    costs = iter([3.0] * 19 + [1000.0])

    def hook(w: RunWriter, s: int) -> None:
        agg = {"frobenius_norm": 1.0, "sigma_max": 1.0, "stable_rank": 2.0, "energy_rank_90": 3.0, "utilization": 0.25}
        w.write("metrics", step=s, kind="structural", reason="interval", metrics=agg, cost_ms=next(costs))

    report = monitor(write_run(log, steps=20, structural=False, hook=hook))
    st = report.structural
    assert st is not None and st.cost_ms_median == 3.0
    assert st.cost_ms_p95 == pytest.approx(3.0 + 0.05 * 997.0)  # numpy's linear p95 of 19 x 3 and one 1000


def test_max_steps_replaces_epochs_and_zero_modules_are_listed(log: Path) -> None:
    start = {**RUN_START, "training_args": {"max_steps": 100, "num_train_epochs": 3.0, "learning_rate": 1e-4}}

    def hook(w: RunWriter, s: int) -> None:
        if s == 5:
            agg = {"frobenius_norm": 1.0, "sigma_max": 1.0, "stable_rank": 2.0, "energy_rank_90": 3.0,
                   "utilization": 0.25}
            w.write("metrics", step=s, kind="structural", reason="interval", metrics=agg, cost_ms=1.0,
                    n_zero_modules=1, zero_modules=[MODULES[1]])

    report = monitor(write_run(log, steps=5, start=start, structural=False, hook=hook))
    assert report.run["training_args"] == {"learning_rate": 1e-4, "max_steps": 100}
    assert report.structural is not None and report.structural.zero_modules == (MODULES[1],)
    assert report.structural.n_zero_modules == 1
    epochs = {**RUN_START, "training_args": {"max_steps": -1, "num_train_epochs": 3.0}}
    report = monitor(write_run(log.with_name("b.jsonl"), steps=5, start=epochs, structural=False))
    assert report.run["training_args"] == {"num_train_epochs": 3.0}
