"""`gradience compare`: subspace overlap, agreement and merge dominance of two LoRA adapters."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import add_top_argument, resolve_adapter, top
from gradience.cli._output import emit_json, header, num
from gradience.mechanic.compare import CompareReport, compare


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="compare two LoRA adapters: subspace overlap, agreement, dominance",
        description="Compare two PEFT adapters module by module: overlap of their top-k singular "
        "subspaces (mean cos of the principal angles), the cosine of the updates, and the merge "
        "dominance D = |S_A - S_B| / (S_A + S_B) of their update norms.",
    )
    p.add_argument("a", metavar="A", help="first adapter folder")
    p.add_argument("b", metavar="B", help="second adapter folder")
    add_top_argument(p)
    p.add_argument("--k", type=int, help="subspace size for the overlaps (default: per module, min energy rank at 90%%)")
    p.add_argument("--json", action="store_true", help="print the CompareReport as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    a, b = (resolve_adapter(x).path for x in (args.a, args.b))
    report = compare(a, b, k=args.k)
    if args.json:
        emit_json(report)
    else:
        print("\n".join(render(report, args.top)))
    return 1 if report.problems else 0  # an unreadable module fails the run; the report still prints


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render(report: CompareReport, n_top: int = 0) -> list[str]:
    out = header("GRADIENCE LoRA COMPARE")
    out += [
        f"A: {report.a_dir}",
        f"B: {report.b_dir}",
        f"Shared modules: {report.n_shared}  only in A: {len(report.only_a)}  only in B: {len(report.only_b)}",
        "",
        f"Update norm S_A / S_B: {num(report.frobenius_norm_a, 4)} / {num(report.frobenius_norm_b, 4)}"
        f"  dominance D = {report.dominance:.3f}",
        f"Agreement (cosine of the updates): {_f(report.agreement)}",
        f"Subspace overlap (mean cos of principal angles) left/right: "
        f"{_f(report.overlap_left_mean)}/{_f(report.overlap_right_mean)}",
        f"  mean cos² left/right: {_f(report.overlap_left_sq_mean)}/{_f(report.overlap_right_sq_mean)}"
        f"  vs random subspaces of the same size (k/n): "
        f"{_f(report.random_overlap_left_sq_mean)}/{_f(report.random_overlap_right_sq_mean)}",
        "",
        f"Verdict: {report.verdict}: {report.verdict_reason}",
        "",
    ]
    # The modules whose subspaces agree least first: where the two adapters learned different things.
    order = sorted(report.modules, key=lambda m: (m.overlap_left is None, m.overlap_left or 0.0))
    shown, left = top(order, n_top)
    out.append(f"Modules ({len(report.modules)}; lowest left overlap first" +
               (f", top {len(shown)} shown; --top 0 for all):" if left else "):"))
    for m in shown:
        out.append(
            f"  k={m.k:<3} overlap L/R={_f(m.overlap_left)}/{_f(m.overlap_right)}"
            f" cos² L/R={_f(m.overlap_left_sq)}/{_f(m.overlap_right_sq)}"
            f" (random {_f(m.random_overlap_left_sq)}/{_f(m.random_overlap_right_sq)})"
            f" agreement={_f(m.agreement)} ratio={_f(m.magnitude_ratio)} {m.status:<5} {m.name}"
        )
    for label, names in (("Only in A", report.only_a), ("Only in B", report.only_b)):
        if names:
            out += ["", f"{label}:"] + [f"  {n}" for n in names]
    if report.warnings:
        out += ["", "Warnings:"] + [f"  - {w}" for w in report.warnings]
    return out
