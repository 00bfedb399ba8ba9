"""`gradience.mechanic.bench`: the paired statistic on hand-computed numbers, and a tiny real bench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gradience.demo import DemoConfig
from gradience.errors import UsageError
from gradience.mechanic.bench import (
    SCOPE_NOTE,
    BenchConfig,
    PairedStat,
    paired_difference,
    run_bench,
    t_quantile_975,
    verdict,
)
from tests.test_demo import needs_training

# --- the statistic ---------------------------------------------------------------------------


def test_paired_difference_on_hand_computed_values() -> None:
    # d = (.01, .03, .02): mean .02, sd √((.01² + .01² + 0) / 2) = .01, se = .01/√3, t₀.₉₇₅(2) = 4.302653
    s = paired_difference([0.80, 0.78, 0.82], [0.79, 0.75, 0.80])
    assert s.n == 3 and s.mean == pytest.approx(0.02) and s.sd == pytest.approx(0.01)
    assert s.se == pytest.approx(0.01 / math.sqrt(3)) and s.t_crit == pytest.approx(4.302653)
    half = 4.302653 * 0.01 / math.sqrt(3)  # 0.024842
    assert (s.low, s.high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert s.low == pytest.approx(-0.004842, abs=1e-6)
    # two seeds, d = (−.1, −.3): mean −.2, sd .1·√2, se .1, t₀.₉₇₅(1) = 12.706205
    s = paired_difference([0.5, 0.4], [0.6, 0.7])
    assert s.mean == pytest.approx(-0.2) and s.se == pytest.approx(0.1)
    assert (s.low, s.high) == (pytest.approx(-0.2 - 1.2706205), pytest.approx(-0.2 + 1.2706205))


def test_paired_difference_edge_cases() -> None:
    one = paired_difference([0.7], [0.6])
    assert one.mean == pytest.approx(0.1) and one.sd is None and one.low is None
    same = paired_difference([0.7, 0.8, 0.9], [0.7, 0.8, 0.9])
    assert (same.mean, same.sd, same.low, same.high) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(UsageError):
        paired_difference([0.1, 0.2], [0.1])


def test_t_quantile_matches_the_table_and_scipy_beyond_it() -> None:
    assert t_quantile_975(1) == 12.706205 and t_quantile_975(30) == 2.042272
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (2, 9, 31, 45, 100, 1000):
        assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-6)


def _stat(low: float, high: float) -> PairedStat:
    return PairedStat(n=3, mean=(low + high) / 2, sd=0.01, se=0.006, t_crit=4.3, low=low, high=high)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.001, 0.05, "better"),
        (-0.05, -0.001, "worse"),
        (-0.015, -0.001, "worse, by less than 2 points"),
        (-0.01, 0.015, "equivalent within ±2 points"),
        (-0.01, 0.05, "not worse by more than 2 points (may be better)"),
        (-0.05, 0.01, "inconclusive (interval spans 0 and the margin)"),
    ],
)
def test_verdict_reads_the_interval_against_zero_and_the_margin(low: float, high: float, expected: str) -> None:
    assert verdict(_stat(low, high), 0.02) == expected


def test_verdict_with_one_seed_is_inconclusive() -> None:
    assert verdict(paired_difference([0.7], [0.6]), 0.02).startswith("inconclusive")


def test_verdict_flags_a_zero_width_interval() -> None:
    # one test sentence in 300 lost on every seed: sd = 0, the interval is the point −1/300
    s = paired_difference([0.69, 0.73, 0.77], [0.69 + 1 / 300, 0.73 + 1 / 300, 0.77 + 1 / 300])
    assert s.sd == pytest.approx(0.0, abs=1e-15)
    stat = PairedStat(n=3, mean=-1 / 300, sd=0.0, se=0.0, t_crit=4.302653, low=-1 / 300, high=-1 / 300)
    assert verdict(stat, 0.02) == "worse, by less than 2 points (same difference on every seed: zero-width interval)"


@pytest.mark.parametrize(
    "bad", [{"seeds": ()}, {"seeds": (0, 0)}, {"steps": 0}, {"policy": "knee"}, {"margin": 1.0}]
)
def test_config_rejects_bad_values_naming_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(UsageError, match=f"`{next(iter(bad))}`"):
        BenchConfig(**bad)  # type: ignore[arg-type]


# --- a tiny real bench -----------------------------------------------------------------------


@needs_training
@pytest.mark.slow
def test_tiny_bench_structure_and_statistic(tmp_path: Path) -> None:
    demo = DemoConfig(n_train=48, n_test=24, batch_size=8, eval_batch_size=24, warmup_steps=0, logging_steps=1)
    config = BenchConfig(seeds=(0, 1), steps=3, probe_rank=4, policy="median", demo=demo)
    lines: list[str] = []
    report = run_bench(tmp_path, config, progress=lines.append)
    assert [s.seed for s in report.seeds] == [0, 1] and lines
    for s in report.seeds:
        assert s.probe.r == 4 and set(s.probe.ranks.values()) == {4}
        assert s.compressed.ranks == s.retrained.ranks  # both arms at the same suggested ranks
        assert s.compressed.lora_params == s.retrained.lora_params <= s.probe.lora_params
        for arm in (s.probe, s.compressed, s.retrained):
            assert 0 <= arm.accuracy <= 1 and arm.accuracy * 24 == pytest.approx(round(arm.accuracy * 24))
        for sub in ("probe/peft", "compressed", "retrained/peft"):
            assert (tmp_path / f"seed-{s.seed}" / sub / "adapter_config.json").is_file(), sub
    by_pair = {(c.arm, c.baseline): c for c in report.comparisons}
    c = by_pair[("compressed", "probe")]
    x = [s.compressed.accuracy for s in report.seeds]
    y = [s.probe.accuracy for s in report.seeds]
    assert c.differences == pytest.approx(tuple(a - b for a, b in zip(x, y, strict=True)))
    assert c.stat == paired_difference(x, y) and c.verdict == verdict(c.stat, config.margin)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    md = (tmp_path / "bench.md").read_text()
    assert SCOPE_NOTE in md and "hypothesis tested on this task only" in md
    assert "| compressed − probe |" in md and "Student-t" in md
