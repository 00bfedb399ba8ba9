"""Why one module got its rank suggestion, read back from a saved audit.

`explain(audit_json, module)` takes the output of `gradience audit --json --layers` and one
module name and returns an `Explanation`: the module's spectrum and energy curve, its k@q,
stable rank and utilization, the rank every registered policy (`gradience.mechanic.policies`) gives
its singular values, how the grid rounding of the uniform suggestions treats it, and how it
compares with the adapter's median module. Nothing is recomputed from weights: the singular
values in the audit are the QR core's, so every number here agrees with the audit.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gradience.errors import AuditFileError, UsageError
from gradience.mechanic.audit import round_up
from gradience.mechanic.policies import POLICIES
from gradience.mechanic.policies import energy as energy_policy

_REQUIRED = ("name", "shape", "r", "status", "singular_values")
_COMPARED = ("energy_rank", "stable_rank", "utilization", "frobenius_norm", "sigma_max", "rel_spectral")


@dataclass(frozen=True)
class PolicyRank:
    """The rank one policy gives this module's singular values."""

    policy: str
    rank: int
    help: str


@dataclass(frozen=True)
class MedianComparison:
    """One metric of this module next to the median over the adapter's auditable modules."""

    metric: str
    value: float | None
    median: float | None
    ratio: float | None  # value / median


@dataclass(frozen=True)
class Explanation:
    """Everything `gradience explain` prints; `to_dict()` is what `--json` prints."""

    audit_path: str
    module: str
    type: str | None
    layer: int | None
    kind: str | None
    shape: tuple[int, int]
    r: int
    scale: float | None
    status: str
    singular_values: tuple[float, ...]
    energy_curve: tuple[float, ...]  # cumulative share of Σσ² held by the top k, k = 1..n
    energy_fraction: float
    energy_rank: int | None  # k@q for the audit's q
    energy_rank_90: int | None
    stable_rank: float | None
    utilization: float | None
    effective_rank: float | None
    suggested_rank: int | None  # the audit's per-module rank_pattern entry
    policies: tuple[PolicyRank, ...]
    grid: tuple[int, ...]
    grid_rank: int | None  # k@q rounded up on the grid, never above r
    uniform_median: int | None
    uniform_p90: int | None
    n_modules: int
    compared: tuple[MedianComparison, ...]
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_audit(path: str | Path) -> dict[str, Any]:
    """A saved audit JSON with per-module rows, or a one-line error saying what to do."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{p}: audit file not found (save one with `gradience audit --json --layers > {p.name}`)") from None
    except IsADirectoryError:
        raise UsageError(f"{p}: is a directory; pass the JSON file written by `gradience audit --json --layers`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditFileError(f"{p}: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or "suggestion" not in data or "summary" not in data:
        raise AuditFileError(f"{p}: not a `gradience audit --json` output (no summary / suggestion)")
    if not isinstance(data.get("modules"), list):
        raise UsageError(f"{p}: has no per-module rows; save the audit with `gradience audit --json --layers`")
    return data


def find_module(rows: Sequence[Mapping[str, Any]], name: str, where: str) -> Mapping[str, Any]:
    """The row named `name`, or the one row whose name ends with it at a `.` / `_` boundary.

    Raises:
        UsageError: no such module (listing close names) or an ambiguous suffix.
    """
    names = [str(r.get("name")) for r in rows]
    if name in names:
        return rows[names.index(name)]
    hits = [i for i, n in enumerate(names) if n.endswith("." + name) or n.endswith("_" + name)]
    if len(hits) == 1:
        return rows[hits[0]]
    if hits:
        shown = ", ".join(names[i] for i in hits[:5])
        raise UsageError(f"module {name!r} is ambiguous in {where}: {len(hits)} match ({shown})")
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"{len(names)} modules there, e.g. {', '.join(names[:3])}"
    raise UsageError(f"no module {name!r} in {where}; {hint}")


def explain(audit_json: str | Path, module: str) -> Explanation:
    """Explain one module's rank suggestion from a saved `gradience audit --json --layers`.

    Args:
        audit_json: path of the saved audit.
        module: the module path, or a unique tail of it (`layers.3.self_attn.q_proj`).

    Returns:
        Explanation.

    Raises:
        UsageError: missing file, an audit saved without --layers, or an unknown module
        (the message lists close matches). AuditFileError: a file that is not an audit.

    Example:
        >>> e = explain("audit.json", "layers.0.self_attn.q_proj")   # doctest: +SKIP
        >>> e.energy_rank, e.suggested_rank, e.grid_rank              # doctest: +SKIP
        (3, 3, 4)
    """
    data = load_audit(audit_json)
    row = find_module(data["modules"], module, str(audit_json))
    missing = [k for k in _REQUIRED if k not in row]
    if missing:
        raise AuditFileError(f"{audit_json}: module {row.get('name')!r} lacks {', '.join(missing)}")
    sug = data["suggestion"] or {}  # null for an all-zero adapter: no suggestion to explain
    q = float(data.get("energy_fraction", sug.get("energy_fraction", 0.9)))
    sigma = np.asarray([float(x) for x in row["singular_values"]], dtype=np.float64)
    shape = (int(row["shape"][0]), int(row["shape"][1]))
    r = int(row["r"])
    grid = tuple(int(g) for g in sug.get("grid", ()))
    k = row.get("energy_rank")
    good = [m for m in data["modules"] if m.get("status") == "ok"]  # zero updates enter no median
    e = Explanation(
        audit_path=str(audit_json), module=str(row["name"]), type=row.get("type"), layer=row.get("layer"),
        kind=row.get("kind"), shape=shape, r=r, scale=row.get("scale"), status=str(row["status"]),
        singular_values=tuple(float(x) for x in sigma), energy_curve=_energy_curve(sigma),
        energy_fraction=q, energy_rank=k, energy_rank_90=row.get("energy_rank_90"),
        stable_rank=row.get("stable_rank"), utilization=row.get("utilization"),
        effective_rank=row.get("effective_rank"),
        suggested_rank=(sug.get("rank_pattern") or {}).get(row["name"]),
        policies=_policies(sigma, shape, q) if row["status"] == "ok" else (),
        grid=grid, grid_rank=min(round_up(max(k, 1), grid), r) if k is not None and grid else None,
        uniform_median=sug.get("uniform_median"), uniform_p90=sug.get("uniform_p90"),
        n_modules=len(data["modules"]), compared=_compare(row, good), reasons=(),
    )
    return replace(e, reasons=tuple(_reasons(e)))


def _energy_curve(sigma: np.ndarray) -> tuple[float, ...]:
    energy = np.cumsum(np.square(sigma))
    if energy.size == 0 or energy[-1] <= 0.0:
        return tuple(0.0 for _ in sigma)
    return tuple(float(x) for x in energy / energy[-1])


def _policies(sigma: np.ndarray, shape: tuple[int, int], q: float) -> tuple[PolicyRank, ...]:
    out = [PolicyRank(p.name, int(p(sigma, shape)), p.help) for p in POLICIES.values()]
    if abs(q - 0.9) > 1e-12:
        out.insert(0, PolicyRank(f"energy@{q:g}", energy_policy(sigma, q), f"smallest k holding {q:.0%} of Σσ² (the audit's q)"))
    return tuple(out)


def _compare(row: Mapping[str, Any], good: Sequence[Mapping[str, Any]]) -> tuple[MedianComparison, ...]:
    out = []
    for metric in _COMPARED:
        values = [float(m[metric]) for m in good if m.get(metric) is not None]
        if not values:
            continue
        median = float(np.median(values))
        value = row.get(metric)
        ratio = float(value) / median if value is not None and median > 0 else None
        out.append(MedianComparison(metric, None if value is None else float(value), median, ratio))
    return tuple(out)


def _reasons(e: Explanation) -> list[str]:
    q = f"{e.energy_fraction:.0%}"
    if e.status == "nonfinite":
        return ["NaN/Inf weights: no spectrum, so the module is left out of the aggregates and suggestions."]
    if e.status == "zero" or e.energy_rank is None:
        return ["All-zero update (untrained, or lora_B still at init): every rank metric is 0, the module "
                "is left out of every aggregate and suggestion, and compress keeps it at rank 1."]
    k = e.energy_rank
    held = e.energy_curve[k - 1]
    out = [f"k@{q} = {k} of r = {e.r}: the top {k} direction(s) hold {held:.1%} of the energy"
           + (f" (the top {k - 1} hold {e.energy_curve[k - 2]:.1%})." if k > 1 else ".")]
    if e.suggested_rank is not None:
        out.append(f"Per-module suggestion r={e.suggested_rank}: the audit's rank_pattern entry is the "
                   f"module's own k@{q}, clipped to [1, r].")
    if e.grid_rank is not None:
        out.append(f"On the grid {','.join(map(str, e.grid))}, k@{q} = {k} rounds up to {e.grid_rank}; the "
                   f"uniform suggestions are r={e.uniform_median} (p50 of k@{q}) and r={e.uniform_p90} (p90).")
        if e.uniform_median is not None and e.grid_rank > e.uniform_median:
            out.append(f"This module needs more than the typical uniform rank r={e.uniform_median}.")
    if k >= e.r:
        out.append("It uses its full allocated rank: the audit cannot say whether more rank would help.")
    med = {c.metric: c for c in e.compared}
    sr = med.get("stable_rank")
    if sr is not None and sr.ratio is not None and e.stable_rank is not None:
        side = "above" if sr.ratio > 1 else "below" if sr.ratio < 1 else "at"
        out.append(f"Stable rank {e.stable_rank:.2f} (utilization {e.utilization or 0.0:.1%}) is {side} the "
                   f"median module's {sr.median:.2f} (x{sr.ratio:.2f}).")
    ranks = {p.policy: p.rank for p in e.policies}
    if ranks:
        spread = f"{min(ranks.values())}-{max(ranks.values())}" if len(set(ranks.values())) > 1 else str(k)
        out.append(f"The registered policies give {spread}: "
                   + ", ".join(f"{name} {rank}" for name, rank in ranks.items()) + ".")
    return out
