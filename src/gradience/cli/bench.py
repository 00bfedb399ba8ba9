"""`gradience bench`: test the audit's rank suggestion on the demo task (probe, compress, retrain)."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._output import emit_json, hint
from gradience.demo.train import DemoConfig
from gradience.mechanic.bench import BenchConfig, render_markdown, run_bench
from gradience.mechanic.compress import AUDIT_POLICIES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="probe at r=16, audit, then compress vs retrain at the suggested ranks over seeds (demo task)",
        description="On the demo task: train a probe adapter at r=16, audit it, then compare "
        "compressing it to the suggested ranks against retraining at them, over several seeds, "
        "with an equivalence margin on test accuracy. Writes bench.md and bench.json.",
    )
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1, one paired observation each (default 3)")
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help=f"training steps per run (default {BenchConfig.steps})")
    p.add_argument("--probe-rank", type=int, default=BenchConfig.probe_rank, help="rank of the probe (default 16)")
    p.add_argument("--policy", choices=AUDIT_POLICIES, default=BenchConfig.policy, help="which suggestion to test (default per-module)")
    p.add_argument("--margin", type=float, default=BenchConfig.margin, help="equivalence margin on test accuracy (default 0.02)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or mps")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run; 0 = every usable core (default)")
    p.add_argument("--out-dir", default="runs/bench", help="runs, bench.md and bench.json go here (default runs/bench)")
    p.add_argument("--json", action="store_true", help="print the BenchReport as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = BenchConfig(
        seeds=tuple(range(args.seeds)) if args.seeds > 0 else (), steps=args.steps,
        probe_rank=args.probe_rank, policy=args.policy, margin=args.margin, demo=DemoConfig(device=args.device, num_threads=args.threads),
    )
    report = run_bench(args.out_dir, config, progress=hint)
    if args.json:
        emit_json(report)
    else:
        print(render_markdown(report), end="")
    return 0
