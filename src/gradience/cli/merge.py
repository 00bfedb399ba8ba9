"""`gradience merge`: write one PEFT LoRA adapter for a weighted sum of two."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import add_top_argument, resolve_adapter, top
from gradience.cli._output import emit_json, header, human_count
from gradience.mechanic.merge import METHODS, MergeReport, merge


def register(sub: Any) -> None:
    p = sub.add_parser(
        "merge", help="merge two LoRA adapters into one (w1·ΔW1 + w2·ΔW2)",
        description="Write one PEFT adapter for w1·ΔW1 + w2·ΔW2: exactly (linear, rank r1 + r2) or "
        "re-factored to a rank (svd, ties, dare), with each module's error against the exact sum.",
    )
    p.add_argument("a", metavar="A", help="first adapter folder (its config is the output's)")
    p.add_argument("b", metavar="B", help="second adapter folder")
    p.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0], metavar=("W1", "W2"), help="default 1 1")
    p.add_argument("--method", choices=METHODS, default="linear", help="default linear (exact, rank r1 + r2)")
    p.add_argument("--rank", type=int, metavar="K", help="output rank for svd, ties and dare")
    p.add_argument("--density", type=float, default=0.5, help="kept fraction for ties and dare (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed for dare (default 0)")
    p.add_argument("--out-dir", required=True, help="folder for the merged adapter")
    p.add_argument("--force", action="store_true", help="overwrite an adapter already in --out-dir")
    add_top_argument(p)
    p.add_argument("--json", action="store_true", help="print the MergeReport as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    a, b = (resolve_adapter(x).path for x in (args.a, args.b))
    report = merge(
        a, b, args.out_dir, weights=tuple(args.weights), method=args.method,
        rank=args.rank, seed=args.seed, density=args.density, force=args.force,
    )
    if args.json:
        emit_json(report)
    else:
        print("\n".join(render(report, args.top)))
    return 0


def render(report: MergeReport, n_top: int = 0) -> list[str]:
    w1, w2 = report.weights
    out = header("GRADIENCE LoRA MERGE")
    out += [
        f"A: {report.a_dir}",
        f"B: {report.b_dir}",
        f"Output: {report.out_dir}",
        f"Method: {report.method}  weights: {w1:g}·A + {w2:g}·B  r={report.r}"
        f"  LoRA params: {human_count(report.lora_params)}",
        f"Relative Frobenius error vs the exact weighted sum: {report.relative_error:.4g}",
        "",
    ]
    order = sorted(report.modules, key=lambda m: -m.relative_error)  # the worst approximations first
    shown, left = top(order, n_top)
    out.append(f"Modules ({len(report.modules)}; largest error first" +
               (f", top {len(shown)} shown; --top 0 for all):" if left else "):"))
    for m in shown:
        out.append(f"  {m.source:<4} r={m.r:<4} error={m.relative_error:.3g}  {m.name}")
    if report.warnings:
        out += ["", "Warnings:"] + [f"  - {w}" for w in report.warnings]
    return out
