"""Does the audit's rank suggestion hold on the demo task? Probe, audit, compress, retrain, over seeds.

For each seed, `bench` trains a probe adapter at rank 16 on the demo task, audits it, and
builds two adapters at the suggested ranks:

    compressed   the probe truncated to the suggested ranks (`compress`, no retraining)
    retrained    a fresh run at the suggested ranks: the compressed adapter's `r`,
                 `rank_pattern` and `lora_alpha`, so both have the same config and scale

All three are scored by the same eval (`evaluate_adapter`) on that seed's test split. The
verdicts come from the paired differences over seeds (arm − probe, same seed): their mean
with a two-sided 95% Student-t interval on n − 1 degrees of freedom. A comparison is
"equivalent" when the whole interval lies within ±margin; "better"/"worse" when it excludes 0;
otherwise "inconclusive". With 3 seeds t₀.₉₇₅ = 4.30, so only large or very consistent
differences resolve. A verdict is a hypothesis tested on this task, with these seeds, only.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gradience.demo.evaluator import DemoEvaluator, demo_evaluator
from gradience.demo.train import DemoConfig, train_demo
from gradience.errors import UsageError
from gradience.mechanic.audit import audit
from gradience.mechanic.compress import AUDIT_POLICIES, compress

__all__ = ["BenchConfig", "BenchReport", "PairedStat", "paired_difference", "render_markdown", "run_bench", "verdict"]

SCOPE_NOTE = (
    "Each verdict is a hypothesis tested on this task only (all-MiniLM-L6-v2 LoRA, fresh/rotten "
    "sentences, these seeds and steps); it does not carry over to other models or data untested."
)
STATISTIC = (
    "mean paired difference in test accuracy (arm − baseline, same seed) with a two-sided 95% "
    "Student-t interval on n − 1 degrees of freedom"
)
# Two-sided 95%: t quantile 0.975 for 1..30 degrees of freedom (beyond, a Cornish-Fisher expansion).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054
ARMS = ("probe", "compressed", "retrained")
COMPARISONS = (("compressed", "probe"), ("retrained", "probe"), ("compressed", "retrained"))


@dataclass(frozen=True)
class BenchConfig:
    """What `gradience bench` runs; `demo` holds the task settings the arms share."""

    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "Seeds; each is one paired observation."})
    steps: int = field(default=120, metadata={"help": "Training steps of the probe and of the retrained run."})
    probe_rank: int = field(default=16, metadata={"help": "LoRA rank of the probe (lora_alpha = 2 · rank)."})
    policy: str = field(default="per-module", metadata={"help": "Suggested ranks: median, p90 or per-module."})
    margin: float = field(default=0.02, metadata={"help": "Equivalence margin on test accuracy (0.02 = 2 points)."})
    demo: DemoConfig = field(
        default_factory=DemoConfig,
        metadata={"help": "Demo settings; rank, lora_alpha, rank_pattern, max_steps, seed, eval_steps are set per arm."},
    )

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"`seeds` must be distinct and non-empty, got {self.seeds!r}")
        for name in ("steps", "probe_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"`{name}` must be a positive integer, got {value!r}")
        if self.policy not in AUDIT_POLICIES:
            raise UsageError(f"`policy` must be one of {', '.join(AUDIT_POLICIES)}, got {self.policy!r}")
        if not 0 <= self.margin < 1:
            raise UsageError(f"`margin` must be in [0, 1), got {self.margin!r}")


@dataclass(frozen=True)
class ArmResult:
    accuracy: float
    loss: float
    lora_params: int
    r: int  # global rank of the adapter's config
    ranks: dict[str, int]  # per module
    wall_time_s: float


@dataclass(frozen=True)
class SeedResult:
    seed: int
    probe: ArmResult
    compressed: ArmResult
    retrained: ArmResult
    compress_retained_energy: float


@dataclass(frozen=True)
class PairedStat:
    """Mean of the paired differences x − y with a two-sided 95% t interval (None for n < 2)."""

    n: int
    mean: float
    sd: float | None  # sample standard deviation (n − 1)
    se: float | None
    t_crit: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Comparison:
    arm: str
    baseline: str
    differences: tuple[float, ...]  # per seed, in the order of `seeds`
    stat: PairedStat
    verdict: str


@dataclass(frozen=True)
class BenchReport:
    """What `gradience bench` prints; `to_dict()` is exactly what `--json` prints."""

    config: BenchConfig
    statistic: str
    seeds: tuple[SeedResult, ...]
    comparisons: tuple[Comparison, ...]
    wall_time_s: float
    note: str = SCOPE_NOTE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table to 30, then expansion)."""
    if df < 1:
        raise UsageError(f"t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def paired_difference(x: Sequence[float], y: Sequence[float]) -> PairedStat:
    """Paired differences d = x − y: mean, sd, se = sd/√n, and mean ± t₀.₉₇₅(n−1) · se.

    Example:
        >>> s = paired_difference([0.80, 0.78, 0.82], [0.79, 0.75, 0.80])  # d = .01, .03, .02
        >>> round(s.mean, 4), round(s.sd, 4), round(s.low, 4), round(s.high, 4)
        (0.02, 0.01, -0.0048, 0.0448)
    """
    if len(x) != len(y) or not x:
        raise UsageError(f"paired samples must be non-empty and of equal length, got {len(x)} and {len(y)}")
    d = [a - b for a, b in zip(x, y, strict=True)]
    n, mean = len(d), statistics.fmean(d)
    if n < 2:
        return PairedStat(n=n, mean=mean, sd=None, se=None, t_crit=None, low=None, high=None)
    sd = statistics.stdev(d)
    se, t = sd / math.sqrt(n), t_quantile_975(n - 1)
    return PairedStat(n=n, mean=mean, sd=sd, se=se, t_crit=t, low=mean - t * se, high=mean + t * se)


def verdict(stat: PairedStat, margin: float) -> str:
    """Read the interval: better / worse (excludes 0), equivalent (inside ±margin), else inconclusive."""
    if stat.low is None or stat.high is None:
        return "inconclusive (one seed: no interval)"
    m = f"{100 * margin:g} points"
    # Accuracies are counts over n_test: identical differences on every seed give sd = 0 and a
    # zero-width interval, which says "consistent over these seeds", not "exact"; say so.
    flat = " (same difference on every seed: zero-width interval)" if stat.sd == 0 and stat.mean != 0 else ""
    if stat.low > 0:
        return "better" + flat
    if stat.high < 0:
        return (f"worse, by less than {m}" if stat.low >= -margin else "worse") + flat
    if stat.low >= -margin and stat.high <= margin:
        return f"equivalent within ±{m}"
    if stat.low >= -margin:
        return f"not worse by more than {m} (may be better)"
    return "inconclusive (interval spans 0 and the margin)"


def run_bench(
    out_dir: str | Path, config: BenchConfig | None = None, progress: Callable[[str], None] | None = None
) -> BenchReport:
    """Probe, audit, compress and retrain per seed; compare the arms by paired differences.

    Args:
        out_dir: runs go to `out_dir/seed-<s>/{probe,compressed,retrained}`; `bench.md` and
            `bench.json` are written at the top (existing runs there are replaced).
        config: what to run; `None` uses `BenchConfig()` (3 seeds × 2 trainings of 120 steps).
        progress: called with one line per stage (the CLI prints them to stderr).

    Returns:
        BenchReport with every arm's scores, the paired statistics and verdicts.

    Raises:
        MissingDependencyError: gradience[hf] or a demo package is missing.
        UsageError: a bad config value.

    Example:
        >>> report = run_bench("runs/bench", BenchConfig(seeds=(0, 1, 2), steps=60))  # doctest: +SKIP
        >>> report.comparisons[0].verdict                                             # doctest: +SKIP
        'equivalent within ±2 points'
    """
    config = config if config is not None else BenchConfig()
    say = progress or (lambda _: None)
    out = Path(out_dir)
    started = time.perf_counter()
    seeds = []
    for seed in config.seeds:
        seeds.append(_run_seed(out / f"seed-{seed}", config, seed, say))
    comparisons = []
    for arm, base in COMPARISONS:
        x = [getattr(s, arm).accuracy for s in seeds]
        y = [getattr(s, base).accuracy for s in seeds]
        stat = paired_difference(x, y)
        diffs = tuple(a - b for a, b in zip(x, y, strict=True))
        comparisons.append(Comparison(arm, base, diffs, stat, verdict(stat, config.margin)))
    report = BenchReport(
        config=config, statistic=STATISTIC, seeds=tuple(seeds), comparisons=tuple(comparisons),
        wall_time_s=round(time.perf_counter() - started, 1),
    )
    (out / "bench.json").write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _run_seed(root: Path, config: BenchConfig, seed: int, say: Callable[[str], None]) -> SeedResult:
    alpha = 2 * config.probe_rank
    common: dict[str, Any] = {"max_steps": config.steps, "seed": seed, "eval_steps": config.steps, "lora_alpha": alpha}
    say(f"seed {seed}: training the probe at r={config.probe_rank} ({config.steps} steps)")
    t0 = time.perf_counter()
    probe = train_demo(root / "probe", replace(config.demo, rank=config.probe_rank, rank_pattern={}, **common))
    probe_s = time.perf_counter() - t0
    evaluator = replace(demo_evaluator(probe.peft_dir), batch_size=config.demo.eval_batch_size, device=config.demo.device)
    say(f"seed {seed}: audit and compress ({config.policy})")
    t0 = time.perf_counter()
    shutil.rmtree(root / "compressed", ignore_errors=True)
    comp = compress(probe.peft_dir, root / "compressed", policy=config.policy)
    comp_s = time.perf_counter() - t0
    saved = json.loads((root / "compressed" / "adapter_config.json").read_text(encoding="utf-8"))
    say(f"seed {seed}: retraining at the suggested ranks (r={saved['r']}, {len(saved['rank_pattern'])} pattern keys)")
    t0 = time.perf_counter()
    retrained = train_demo(
        root / "retrained",
        replace(config.demo, rank=int(saved["r"]), rank_pattern=dict(saved["rank_pattern"]), **common),
    )
    retrain_s = time.perf_counter() - t0
    say(f"seed {seed}: scoring the three arms on the seed's test split")
    return SeedResult(
        seed=seed,
        probe=_score(evaluator, probe.peft_dir, probe_s),
        compressed=_score(evaluator, root / "compressed", comp_s),
        retrained=_score(evaluator, retrained.peft_dir, retrain_s),
        compress_retained_energy=comp.retained_energy,
    )


def _score(evaluator: DemoEvaluator, peft_dir: Path, wall_s: float) -> ArmResult:
    metrics = evaluator(peft_dir)
    audited = audit(peft_dir)
    return ArmResult(
        accuracy=metrics["accuracy"], loss=metrics["loss"], lora_params=audited.summary.lora_params,
        r=audited.r, ranks={m.name: m.r for m in audited.modules}, wall_time_s=round(wall_s, 1),
    )


def render_markdown(report: BenchReport) -> str:
    c = report.config
    lines = [
        "# gradience bench: audit-suggested ranks on the demo task",
        "",
        f"Probe r={c.probe_rank} (lora_alpha={2 * c.probe_rank}), {c.steps} steps, seeds {list(c.seeds)}, "
        f"policy `{c.policy}`, n_train={c.demo.n_train}, n_test={c.demo.n_test} (each seed its own split). "
        f"Wall time {report.wall_time_s:.0f} s.",
        "",
        "| seed | probe acc | compressed acc | retrained acc | probe params | suggested params | energy kept |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report.seeds:
        lines.append(
            f"| {s.seed} | {s.probe.accuracy:.4f} | {s.compressed.accuracy:.4f} | {s.retrained.accuracy:.4f} "
            f"| {s.probe.lora_params} | {s.compressed.lora_params} | {100 * s.compress_retained_energy:.1f}% |"
        )
    lines += [
        "",
        f"Statistic: {report.statistic}; equivalence margin ±{100 * c.margin:g} accuracy points.",
        "",
        "| comparison | differences | mean | 95% interval | verdict |",
        "|---|---|---:|---|---|",
    ]
    for cmp in report.comparisons:
        st = cmp.stat
        interval = "n/a" if st.low is None or st.high is None else f"[{st.low:+.4f}, {st.high:+.4f}]"
        diffs = ", ".join(f"{d:+.4f}" for d in cmp.differences)
        lines.append(f"| {cmp.arm} − {cmp.baseline} | {diffs} | {st.mean:+.4f} | {interval} | {cmp.verdict} |")
    lines += ["", report.note, ""]
    return "\n".join(lines)
