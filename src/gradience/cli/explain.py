"""`gradience explain`: why one module of a saved audit got its rank suggestion."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import add_input_argument, input_arg
from gradience.cli._output import emit_json, header, num, pct
from gradience.mechanic.explain import Explanation, explain


def register(sub: Any) -> None:
    p = sub.add_parser(
        "explain", help="why one module got its rank suggestion (from a saved audit)",
        description="Explain one module of a saved `gradience audit --json --layers` output: its "
        "spectrum, k@q, stable rank, utilization, each rank policy, the grid rounding, and the "
        "adapter's median module.",
    )
    add_input_argument(p, "audit", "AUDIT_JSON", "--audit", "output of `gradience audit --json --layers`")
    p.add_argument("--module", required=True, metavar="NAME", help="module path, or a unique tail of it")
    p.add_argument("--json", action="store_true", help="print the Explanation as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = explain(input_arg(args, "audit", "--audit", "a saved `gradience audit --json --layers` file"), args.module)
    if args.json:
        emit_json(result)
    else:
        print("\n".join(render(result)))
    return 0


def render(e: Explanation) -> list[str]:
    q = f"{e.energy_fraction:.0%}"
    out = header("GRADIENCE EXPLAIN")
    out += [
        f"Module: {e.module}",
        f"  {e.type} {e.kind} {e.shape[0]}x{e.shape[1]} layer={e.layer if e.layer is not None else '-'}"
        f" r={e.r} scale={num(e.scale, 4)} status={e.status}",
        f"  k@{q}={e.energy_rank}" + (f" k@90%={e.energy_rank_90}" if q != "90%" else "")
        + f" stable rank={num(e.stable_rank)}"
        f" utilization={pct(e.utilization)} effective rank={num(e.effective_rank)}",
        "",
        "Singular values and cumulative energy:",
    ]
    for i, (sigma, share) in enumerate(zip(e.singular_values, e.energy_curve, strict=True), 1):
        mark = f"  <- k@{q}" if i == e.energy_rank else ""
        out.append(f"  {i:>3}  sigma={sigma:.4g}  energy={share:.1%}{mark}")
    if e.policies:
        out += ["", "Rank policies:"] + [f"  {p.policy:<24} {p.rank:>3}  {p.help}" for p in e.policies]
    out += ["", f"Compared with the median of {e.n_modules} modules:"]
    for c in e.compared:
        ratio = f"x{c.ratio:.2f}" if c.ratio is not None else "n/a"
        out.append(f"  {c.metric:<15} {num(c.value, 4):>10}  median {num(c.median, 4):>10}  {ratio}")
    out += ["", "Why:"] + [f"  - {r}" for r in e.reasons]
    return out
