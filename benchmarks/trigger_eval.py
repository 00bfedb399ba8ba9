"""Trigger-based eval against a fixed schedule at the trigger's top frequency, on the demo task.

Two demo runs (all-MiniLM-L6-v2 + LoRA on review sentiment, CPU), same seed and data, both
with a Gradience callback taking a structural snapshot every `--structural-interval` steps
so their training costs match:

  (a) fixed: the Trainer evaluates every `--min-spacing` steps (the most often the trigger
      policy may), `GradienceCallback(eval_policy="fixed")`;
  (b) trigger: Trainer eval_strategy "no", `GradienceCallback(eval_policy="trigger")`.

Both end with an eval at the last step, so their final eval losses compare. Eval time is
wall clock measured here: from the end of the step an eval follows (after Gradience's
snapshot) to the end of its last split's `on_evaluate`.

Evaluating feeds nothing back into training here (no early stopping, no best-model
reload), but each eval dataloader draws its base seed from the global torch RNG, so after
the first eval the two runs draw different dropout masks and train apart like two seeds.
`--isolate-rng` restores the RNG state after every eval, so both runs train identically
and the final losses differ only by what the schedule itself changes (nothing): a control.

Target: >= 40% less eval time than (a) at a final eval loss within 1%.

Usage: python benchmarks/trigger_eval.py [--max-steps 60] [--min-spacing 5] [--max-spacing 20]
Writes the two run folders under benchmarks/out/trigger_eval/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = Path(__file__).parent / "out" / "trigger_eval"


def eval_timer() -> Any:
    """A callback summing the wall time of each eval (all splits of one step together)."""
    from transformers import TrainerCallback

    class EvalTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.mark = time.perf_counter()
            self.seconds: dict[int, float] = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.mark = time.perf_counter()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            step = state.global_step
            self.seconds[step] = self.seconds.get(step, 0.0) + now - self.mark
            self.mark = now

    return EvalTimer()


def rng_isolation() -> Any:
    """A callback that puts the torch CPU RNG back after each eval, as if none had run."""
    import torch
    from transformers import TrainerCallback

    class IsolateRng(TrainerCallback):  # type: ignore[misc]
        state = None

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            self.state = torch.get_rng_state()

        def on_evaluate(self, *a: Any, **kw: Any) -> None:
            if self.state is not None:
                torch.set_rng_state(self.state)

    return IsolateRng()


def run(name: str, args: argparse.Namespace, policy: Any) -> dict[str, Any]:
    """One demo run; returns its evals, eval seconds, final eval loss and wall time."""
    from gradience.demo import DemoConfig, train_demo
    from gradience.integrations.hf import GradienceCallback
    from gradience.telemetry import iter_records

    out = OUT / (name + ("-isolated" if args.isolate_rng else ""))
    shutil.rmtree(out, ignore_errors=True)
    trigger = name == "trigger"
    config = DemoConfig(
        max_steps=args.max_steps, n_train=args.max_steps * 16, n_test=args.n_test,
        eval_steps=args.min_spacing, num_threads=args.threads, seed=args.seed,
    )  # fmt: skip
    gradience = GradienceCallback(
        out, structural_interval=args.structural_interval,
        eval_policy="trigger" if trigger else "fixed", trigger=policy if trigger else None,
    )  # fmt: skip
    timer = eval_timer()  # last of ours, so its mark follows Gradience's snapshot
    overrides = {"eval_strategy": "no"} if trigger else {}
    started = time.perf_counter()
    callbacks = [gradience, timer, *([rng_isolation()] if args.isolate_rng else [])]
    result = train_demo(out, config, callbacks=callbacks, training_overrides=overrides)
    wall = time.perf_counter() - started
    records = [r.data for r in iter_records(out / "run.jsonl")]
    reasons = [f"{r['step']}:{r['reason']}" for r in records if r.get("kind") == "eval_trigger"]
    end = next(r for r in reversed(records) if r["event"] == "run_end")
    return {
        "evals": sorted(timer.seconds), "eval_s": sum(timer.seconds.values()),
        "final_loss": result.test_loss, "final_acc": result.test_accuracy, "wall_s": wall,
        "triggers": reasons, "savings": end.get("eval_savings"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--n-test", type=int, default=100, help="test sentences (the train-split eval: as many)")
    parser.add_argument("--min-spacing", type=int, default=5, help="trigger floor = the fixed schedule's interval")
    parser.add_argument("--max-spacing", type=int, default=20)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--structural-interval", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isolate-rng", action="store_true", help="restore the torch RNG after each eval")
    args = parser.parse_args()

    from gradience.integrations.trigger import TriggerPolicy

    policy = TriggerPolicy(window=args.window, min_spacing=args.min_spacing, max_spacing=args.max_spacing)
    fixed = run("fixed", args, policy)
    trig = run("trigger", args, policy)

    print(f"demo task: {args.max_steps} steps, n_test={args.n_test} (x2 splits per eval), seed {args.seed}, "
          f"structural_interval={args.structural_interval}, isolate_rng={args.isolate_rng}")  # fmt: skip
    print(f"policy: {json.dumps(policy.to_dict())}")
    print(f"{'':<28}{'fixed (every ' + str(args.min_spacing) + ')':>20}{'trigger':>14}{'ratio':>10}")
    rows = [
        ("evals", len(fixed["evals"]), len(trig["evals"]), "{:d}"),
        ("eval wall-clock s", fixed["eval_s"], trig["eval_s"], "{:.2f}"),
        ("mean s per eval", fixed["eval_s"] / len(fixed["evals"]), trig["eval_s"] / len(trig["evals"]), "{:.2f}"),
        ("final eval loss (test)", fixed["final_loss"], trig["final_loss"], "{:.5f}"),
        ("final accuracy (test)", fixed["final_acc"], trig["final_acc"], "{:.4f}"),
        ("run wall-clock s", fixed["wall_s"], trig["wall_s"], "{:.1f}"),
    ]
    for label, a, b, fmt in rows:
        print(f"{label:<28}{fmt.format(a):>20}{fmt.format(b):>14}{b / a if a else float('nan'):>10.3f}")
    print(f"eval steps, fixed:   {fixed['evals']}")
    print(f"eval steps, trigger: {trig['evals']}")
    print(f"triggers (step:reason): {', '.join(trig['triggers'])}")
    print(f"trigger run_end eval_savings: {json.dumps({k: v for k, v in trig['savings'].items() if k != 'policy'})}")
    saved = 1 - trig["eval_s"] / fixed["eval_s"]
    loss_diff = abs(trig["final_loss"] - fixed["final_loss"]) / fixed["final_loss"]
    ok = saved >= 0.40 and loss_diff <= 0.01
    print(f"eval time saved: {saved:.1%} (target >= 40%); final loss difference: {loss_diff:.3%} (target <= 1%)"
          f" -> {'MET' if ok else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
