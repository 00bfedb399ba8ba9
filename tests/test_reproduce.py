"""experiments/reproduce_sync.py on synthetic logs: the mismatched copy, forward-fill lags, the doc.

No training: the logs are written with RunWriter in the layout the script reads with --reuse.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from gradience.telemetry import RunWriter, iter_records

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reproduce_sync.py"
METRICS = ("frobenius_norm", "sigma_max", "stable_rank", "energy_rank_90")


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce_sync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_sync"] = module  # dataclasses and annotations resolve through it
    spec.loader.exec_module(module)
    return module


def write_log(path: Path, seed: int, every: int = 10, n: int = 16) -> Path:
    """Structure (a random walk with drift) and eval loss (its mirror) both every `every` steps."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(0.1, 1.0, n)) + 10.0
    with RunWriter(path, run_id=f"seed{seed}") as w:
        w.write("run_start", step=0, structural_interval=every)
        for i in range(n):
            step = every * (i + 1)
            w.write("eval", step=step, split="test", metrics={"loss": 20.0 - x[i]})
            agg = {m: float(x[i] * (k + 1)) for k, m in enumerate(METRICS)}
            w.write("metrics", step=step, kind="structural", reason="eval", metrics=agg)
        w.write("run_end", step=every * n, status="ok")
    return path


def test_mismatched_copy_keeps_structure_on_the_coarse_grid_only(script: ModuleType, tmp_path: Path) -> None:
    log = write_log(tmp_path / "run.jsonl", seed=0)
    copy = script.derive_mismatched(log, 20)
    recs = list(iter_records(copy))
    structural = [r.step for r in recs if r.event == "metrics"]
    assert structural == list(range(20, 161, 20))
    assert [r.step for r in recs if r.event == "eval"] == list(range(10, 161, 10))
    assert copy.name == "mismatched.jsonl" and log.read_text() != copy.read_text()


def test_forward_fill_reads_as_a_lag_and_statsmodels_mirrors_it(script: ModuleType, tmp_path: Path) -> None:
    tilts = []
    for seed in range(4):
        copy = script.derive_mismatched(write_log(tmp_path / f"s{seed}" / "run.jsonl", seed), 20)
        rows = script.forward_fill_lags(copy)
        for row in rows.values():
            for basis in ("differences", "levels"):
                ours, theirs = row[f"gradience_{basis}"], row[f"statsmodels_{basis}"]
                assert ours is not None and theirs is not None and ours <= 0 <= theirs
            tilts.append(row["tilt_levels"])
    # Stale structure pairs an older adapter with a newer loss: lag -1 outweighs +1.
    assert all(t > 0 for t in tilts), tilts


def test_reuse_writes_the_doc_from_the_logs(script: ModuleType, tmp_path: Path) -> None:
    out, seeds = tmp_path / "runs", [1, 2, 3]
    for seed in seeds:
        write_log(out / f"seed{seed}" / "run.jsonl", seed)
        training = out / f"seed{seed}" / "training"
        training.mkdir()
        config = {"rank": 8, "lora_alpha": 16, "target_modules": ["query"], "n_train": 100,
                  "n_test": 50, "learning_rate": 2e-3, "warmup_steps": 1, "batch_size": 4,
                  "max_steps": 160, "eval_steps": 10, "num_threads": 1, "seed": seed}  # fmt: skip
        (training / "demo_config.json").write_text(json.dumps(config))
        (training / "result.json").write_text(json.dumps({"wall_time_s": 1.0, "test_accuracy": 0.5}))
    doc = tmp_path / "reproduction.md"
    args = ["--reuse", "--out", str(out), "--doc", str(doc), "--seeds", *map(str, seeds)]
    assert script.main(args) == 0
    text = doc.read_text(encoding="utf-8")
    assert "--every 10 --steps 160 --n-test 50 --threads 1 --seeds 1 2 3 --out" in text
    assert "cadence matched = true, 48 of 48 eval steps" in text
    assert "cadence matched = false, structural every 20, eval every 10" in text
    assert "| frobenius_norm | 1.000 / 0 |" not in text  # r is -1: structure up, loss down
    assert "| frobenius_norm | -1.000 / 0 | -1.000 / 0 | -1.000 / 0 | 1.000 |" in text
    assert "refused, refused, refused |" in text
    assert "refused lead/lag in 12 of 12 pairs" in text
    # Loss is exactly 20 - structure, so every matched cross-correlation peaks at lag 0 with -1
    # (4 metrics x (3 seeds + mean) x 2 bases); the stale forward-filled values never reach -1.
    assert "| metric | seed | lag -3 | lag -2 | lag -1 | lag 0 | lag +1 | lag +2 | lag +3 |" in text
    assert text.count("| **-1.00** |") == 32
    assert "Cross-correlation, forward-filled mismatched cadence, differences" in text
    assert "moved onto −1 by the fill: 0." in text


def test_lead_verdict_counts_lags_the_fill_moved_onto_minus_one(script: ModuleType, tmp_path: Path) -> None:
    seeds = [1, 2, 3]
    logs = [write_log(tmp_path / f"s{seed}" / "run.jsonl", seed) for seed in seeds]
    matched = script.analyze(logs, METRICS, max_lag=script.MAX_LAG)  # best lag 0 everywhere
    filled = {seed: {m: {"gradience_differences": -1 if seed == 2 else 0, "gradience_levels": 0}
                     for m in METRICS} for seed in seeds}  # fmt: skip
    # One filled pair carries its cross-correlation: loss one interval behind a random walk.
    walk = np.random.default_rng(7).normal(0.0, 1.0, 60).cumsum()
    lagging = script.ccf(walk[:-1], walk[1:], script.MAX_LAG, "differences")
    assert lagging.best_lag == -1 and lagging.significant
    filled[2]["sigma_max"]["ccf_differences"] = lagging
    lines = script.lead_verdict(matched, filled)
    assert "differences: 4 of 12 pairs after the forward fill, 0 of 12 in the same runs" in lines[0]
    assert "frobenius_norm seed 2 (0 → −1)" in lines[0] and "seed 1" not in lines[0]
    assert "levels: 0 of 12 pairs after the forward fill" in lines[1]
    expected = f"sigma_max seed 2 (0 → −1, ccf {lagging.best_value:+.2f} outside ±{lagging.band:.2f})"
    assert lagging.best_value > 0.9 and expected in lines[0]
    assert "as a best lag in 4 of 24 metric×seed×basis cases, 1 of them with a peak outside" in lines[2]
