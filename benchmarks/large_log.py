"""Do `gradience monitor` and `gradience analyze` stay fast and flat on a million-record log?

Writes a realistic `run.jsonl` (run_start; a train_step per step; every 50 steps an eval on
`test` and `train` and a structural snapshot of a few modules; run_end) straight to disk as
schema-valid lines, then times `gradience monitor --json` and `gradience analyze --json` on
it as fresh processes: wall seconds and peak RSS. Run at two sizes (default 250k and 1M
records): a streaming reader's peak RSS should be about the same at both.

With `--baseline-src DIR` (the `src` folder of another checkout, e.g. `git worktree add
/tmp/base 9ef621a`), the same commands also run on that code, interleaved with ours so both
see the same machine, and the ratio of the medians is printed: on a shared machine whose
speed drifts by tens of percent, the ratio is the figure that holds.

Usage: python benchmarks/large_log.py [--records 250000 1000000] [--repeats 3] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from _process import Measured, compile_bytecode, gradience_exe, spawn

OUT = Path(__file__).resolve().parent / "out" / "large_log"
SCHEMA = "gradience.run/1"
RUN_ID = "b3nchmark0000001"
EVAL_EVERY = 50
MODULES = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]

def _line(seq: int, event: str, step: int | None, **fields: object) -> str:
    record = {"schema": SCHEMA, "ts": 1767225600.0 + seq * 0.01, "run_id": RUN_ID, "seq": seq,
              "event": event, "step": step, **fields}  # fmt: skip
    return json.dumps(record, separators=(",", ":")) + "\n"


def _structural(step: int) -> dict[str, object]:
    """A structural snapshot: per-module metrics and the aggregates DESIGN.md defines."""
    grow = 1 - math.exp(-step / 1000.0)
    modules: dict[str, dict[str, float]] = {}
    for i, name in enumerate(MODULES):
        stable = round(2.0 + 0.1 * i + 0.2 * math.sin(step / 1000.0), 4)
        modules[name] = {
            "frobenius_norm": round(0.05 * (1 + i) * grow, 6),
            "sigma_max": round(0.03 * (1 + i) * grow, 6),
            "stable_rank": stable,
            "energy_rank_90": 4 + i % 3,
            "utilization": round(stable / 8, 4),
        }
    rows = list(modules.values())
    aggregate = {
        "frobenius_norm": round(math.sqrt(sum(m["frobenius_norm"] ** 2 for m in rows)), 6),
        "sigma_max": max(m["sigma_max"] for m in rows),
        **{k: round(sum(m[k] for m in rows) / len(rows), 6)
           for k in ("stable_rank", "energy_rank_90", "utilization")},
    }  # fmt: skip
    return {"kind": "structural", "reason": "eval", "metrics": aggregate, "modules": modules,
            "cost_ms": 3.1}  # fmt: skip


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def write_log(path: Path, n_records: int) -> Path:
    """A schema-valid run log of exactly `n_records` lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seq, step = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_line(seq, "run_start", 0, config={"model": "bench", "r": 8, "lora_alpha": 16,
                 "target_modules": ["q_proj", "v_proj"]}, structural_interval=EVAL_EVERY))  # fmt: skip
        seq += 1
        while seq < n_records - 1:
            step += 1
            loss = 2.0 * math.exp(-step / 20000) + 0.3 + 0.05 * math.sin(step)
            fh.write(_line(seq, "train_step", step, loss=round(loss, 5), lr=0.0002,
                           grad_norm=round(1.0 + 0.3 * math.cos(step), 4)))  # fmt: skip
            seq += 1
            if step % EVAL_EVERY == 0:
                for split, bias in (("test", 0.15), ("train", 0.0)):
                    if seq < n_records - 1:
                        el = 2.0 * math.exp(-step / 20000) + 0.3 + bias
                        fh.write(_line(seq, "eval", step, split=split, metrics={
                            "loss": round(el, 5), "accuracy": round(1 - el / 3, 4),
                            "ppl": round(math.exp(el), 4)}))  # fmt: skip
                        seq += 1
                if seq < n_records - 1:
                    fh.write(_line(seq, "metrics", step, **_structural(step)))
                    seq += 1
        fh.write(_line(seq, "run_end", step, status="ok"))
    return path


TARGET_S = {"monitor": 3.0, "analyze": 5.0}  # issue 12, whole process on 1,000,000 records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command; the median is shown")
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/ to time side by side")
    parser.add_argument("--commands", nargs="+", default=["monitor", "analyze"], choices=["monitor", "analyze"])
    args = parser.parse_args()
    baseline_env = None
    if args.baseline_src:
        baseline_env = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
        compileall.compile_dir(args.baseline_src, quiet=1)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}; "
          f"targets at 1M records: monitor <= {TARGET_S['monitor']} s, analyze <= {TARGET_S['analyze']} s, peak RSS flat")
    print(f"{'records':>9} {'MiB':>6} {'command':<8} {'wall s':>7} {'CPU s':>6} {'peak RSS MiB':>13}"
          f" {'target s':>8} {'load':>6}")
    print(compile_bytecode())
    for n in args.records:
        path = OUT / f"run_{n}.jsonl"
        if not path.exists() or _count_lines(path) != n:
            t0 = time.perf_counter()
            write_log(path, n)
            print(f"  (wrote {path.name} in {time.perf_counter() - t0:.1f} s)")
        size = path.stat().st_size / 2**20
        for command in args.commands:
            argv = [gradience_exe(), command, str(path), "--json"]
            runs, base = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same load
                runs.append(spawn(argv))
                if baseline_env is not None:
                    base.append(spawn(argv, baseline_env))
            wall = _report(n, size, command, runs, f"{TARGET_S[command]:>8}")
            if base:
                base_wall = _report(n, size, command, base, f"{'baseline':>8}")
                print(f"{'':>16} ratio baseline / ours, same run: {base_wall / wall:.2f}x wall,"
                      f" {statistics.median(r.cpu for r in base) / statistics.median(r.cpu for r in runs):.2f}x CPU")


def _report(n: int, size: float, command: str, runs: list[Measured], label: str) -> float:
    wall, cpu = statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs)
    print(f"{n:>9} {size:>6.0f} {command:<8} {wall:>7.2f} {cpu:>6.2f} {max(r.rss_mib for r in runs):>13.1f}"
          f" {label} {os.getloadavg()[0]:>6.2f}"
          f"   (median of {len(runs)}; wall runs {', '.join(f'{r.wall:.2f}' for r in runs)})")
    return wall


if __name__ == "__main__":
    main()
