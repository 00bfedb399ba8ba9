"""`gradience compress`: truncated-SVD re-factorisation of a PEFT LoRA adapter to lower ranks."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import (
    adapter_arg,
    add_adapter_argument,
    add_top_argument,
    resolve_adapter,
    top,
)
from gradience.cli._output import emit_json, header, human_count, num, pct
from gradience.mechanic.compress import AUDIT_POLICIES, CompressReport, Verification, compress
from gradience.mechanic.policies import POLICIES
from gradience.mechanic.verify_cmd import CommandEvaluator


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compress", help="re-factor a LoRA adapter to lower ranks by truncated SVD",
        description="Write a PEFT adapter re-factored to lower ranks (uniform, by energy, by the "
        "audit's suggestions or a parameter budget), with the closed-form error of every module; "
        "--verify-cmd scores the original and the compressed adapter with your own eval.",
    )
    add_adapter_argument(p, "input PEFT adapter folder")
    p.add_argument("--out-dir", required=True, help="folder for the compressed adapter")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, metavar="K", help="keep K directions in every module")
    how.add_argument("--energy", type=float, metavar="Q", help="keep each module's smallest k holding Q of Σσ²")
    how.add_argument(
        "--policy", metavar="NAME",
        help=f"rank policy: {', '.join(AUDIT_POLICIES)} (the audit's suggestions) or {', '.join(POLICIES)}",
    )
    how.add_argument("--budget-params", type=int, metavar="N", help="at most N LoRA parameters, spent by energy per parameter")
    p.add_argument("--force", action="store_true", help="overwrite an adapter already in --out-dir")
    check = p.add_mutually_exclusive_group()
    check.add_argument(
        "--verify-cmd", metavar="CMD",
        help="your eval, run on the original and the compressed adapter: {adapter} is replaced by the "
        'adapter folder and CMD prints a JSON object with numbers, e.g. {"eval_loss": 0.41}',
    )
    check.add_argument(
        "--verify", action="store_true",
        help="score the demo task (test accuracy and loss) before and after; needs gradience[hf] and a demo adapter",
    )
    p.add_argument("--verify-timeout", type=float, metavar="S", help="seconds each --verify-cmd run may take")
    add_top_argument(p)
    p.add_argument("--device", default="cpu", help="torch device of the --verify eval (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the CompressReport as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    peft_dir = resolve_adapter(adapter_arg(args)).path
    verify: Any = None
    if args.verify_cmd:
        verify = CommandEvaluator(args.verify_cmd, args.verify_timeout)
    elif args.verify:  # checked before anything is written; imports torch only when asked
        from gradience.demo.evaluator import demo_evaluator

        verify = demo_evaluator(peft_dir, device=args.device)
    report = compress(
        peft_dir, args.out_dir, rank=args.rank, energy=args.energy, policy=args.policy,
        budget_params=args.budget_params, force=args.force, verify=verify,
    )
    if args.json:
        emit_json(report)
    else:
        print("\n".join(render(report, args.top)))
    return 0


def render(report: CompressReport, n_top: int = 0) -> list[str]:
    out = header("GRADIENCE LoRA COMPRESS")
    out += [
        f"Input:  {report.peft_dir}",
        f"Output: {report.out_dir}",
        f"Selector: {report.selector}={report.value}  ->  r={report.r} (rank_pattern for the rest)"
        f" alpha={num(report.lora_alpha)} rsLoRA={'yes' if report.use_rslora else 'no'}",
        "",
        f"LoRA params: {human_count(report.params_before)} -> {human_count(report.params_after)}"
        f" ({pct(report.param_reduction)} fewer)",
        f"Energy retained: {pct(report.retained_energy)}",
        f"Relative Frobenius error: {report.relative_frobenius_error:.4g}",
        f"Relative spectral error (worst module): {report.relative_spectral_error:.4g}",
        f"Storage error (written dtype vs exact truncation): {report.storage_error:.3g}",
        "",
    ]
    order = sorted(report.modules, key=lambda m: -m.relative_frobenius_error)  # most lost first
    shown, left = top(order, n_top)
    out.append(f"Modules ({len(report.modules)}; largest error first" +
               (f", top {len(shown)} shown; --top 0 for all):" if left else "):"))
    for m in shown:
        out.append(
            f"  r {m.r_before:>3} -> {m.r_after:<3} energy={pct(m.retained_energy):>6}"
            f" frob_err={m.relative_frobenius_error:.3g} spec_err={m.relative_spectral_error:.3g}  {m.name}"
        )
    if report.warnings:
        out += ["", "Warnings:"] + [f"  - {w}" for w in report.warnings]
    if report.verify is not None:
        out += ["", *render_verification(report.verify)]
    else:
        out += ["", "Errors are closed form from the spectrum; only an eval tells whether the dropped directions mattered."]
    return out


def render_verification(v: Verification) -> list[str]:
    out = [f"Verify: {v.evaluator}", f"  {'metric':<12} {'before':>10} {'after':>10} {'delta':>10}"]
    for key, after in v.after.items():
        before, delta = v.before.get(key), v.delta.get(key)
        out.append(f"  {key:<12} {_f(before):>10} {_f(after):>10} {_f(delta, signed=True):>10}")
    out.append("  One eval on one split: a small delta says these dropped directions did not matter here.")
    return out


def _f(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"
