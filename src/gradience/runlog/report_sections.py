"""Report sections that come from beside the log: the adapter's audit, the pre-flight check,
and the trigger evals.

A run folder as `train_demo` and most training scripts leave it holds `run.jsonl`, the adapter
(`peft/`, or the folder itself) and the training settings (`training/training_args.json`). The
report runs `audit` and `check` on them itself, so a newcomer sees the adapter's structure
without a separate `audit --append`; the audit is rendered as tables (the most rank-hungry
modules with their share of the update energy, per-layer energy bars, suggested ranks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradience.mechanic.audit import AuditReport, ModuleAudit
from gradience.preflight.check import CheckReport
from gradience.runlog._html import bar, esc, g, kv, num, pct, table, ul
from gradience.runlog.triggers import TriggerSummary, savings_line

ADAPTER_CONFIG, TRAINING_ARGS = "adapter_config.json", "training_args.json"
TOP_MODULES = 10


def adapter_beside(log: str | os.PathLike[str]) -> Path | None:
    """The adapter folder next to a run log: `<run>/peft/`, `<run>/adapter/` or `<run>/` itself."""
    run = Path(log).parent
    for folder in (run / "peft", run / "adapter", run):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    return None


def training_beside(log: str | os.PathLike[str]) -> Path | None:
    """The folder with training_args.json next to a run log (`<run>/training/` or `<run>/`)."""
    run = Path(log).parent
    for folder in (run / "training", run):
        if (folder / TRAINING_ARGS).is_file():
            return folder
    return None


def energy_shares(modules: Sequence[ModuleAudit]) -> dict[str, float]:
    """Each module's share of the adapter's update energy Σ‖ΔW‖_F² (DESIGN.md's energy: squared σ).

    Uses the audit's own `energy_share` when it reports one.
    """
    own = {m.name: getattr(m, "energy_share", None) for m in modules}
    if all(isinstance(v, float) for v in own.values()) and own:
        return {k: float(v) for k, v in own.items() if v is not None}
    energy = {m.name: (m.frobenius_norm or 0.0) ** 2 for m in modules if m.status == "ok"}
    total = sum(energy.values())
    return {k: v / total for k, v in energy.items()} if total > 0 else {}


def rank_hungry(modules: Sequence[ModuleAudit], n: int = TOP_MODULES) -> list[ModuleAudit]:
    """The modules that use most of their rank: highest energy rank k@90 relative to r, then utilization."""
    ok = [m for m in modules if m.status == "ok" and m.r]
    return sorted(ok, key=lambda m: (-(m.energy_rank_90 or 0) / m.r, -(m.utilization or 0.0), m.name))[:n]


def audit_tables(a: AuditReport, where: str) -> str:
    """The audit as tables: summary, the most rank-hungry modules, per-layer energy, suggestions."""
    s, share = a.summary, energy_shares(a.modules)
    top_share = max(share.values(), default=0.0) or 1.0  # bars are to scale across every module

    def share_bar(name: str) -> Any:
        return bar(share.get(name, 0.0) / top_share, pct(share.get(name)))

    parts = [f"<h2>Adapter audit ({esc(where)})</h2>", kv([
        ("Modules", f"{s.n_modules} in {s.n_layers} layers; r={num(a.r)}, alpha={num(a.lora_alpha)}"
                    f"{', rsLoRA' if a.use_rslora else ''}{', DoRA' if a.use_dora else ''}"),
        ("LoRA parameters", f"{s.lora_params:,}"),
        ("Stable rank (mean / median)", f"{num(s.stable_rank_mean)} / {num(s.stable_rank_median)}"),
        ("Utilization = stable rank / r (mean)", pct(s.utilization_mean)),
        ("Update norm |dW|_F (whole adapter)", g(s.frobenius_norm_total)),
    ])]  # fmt: skip
    hungry = rank_hungry(a.modules)
    if hungry:
        has_base = any(m.rel_frobenius is not None for m in hungry)
        head = ["module", "r", "k@90%", "stable rank", "utilization", "energy share"]
        head += ["|dW|_F/|W|_F"] if has_base else []
        parts += ["<h3>Most rank-hungry modules</h3>",
                  '<p class="note">Ranked by how much of their rank they use (energy rank k@90% / r). '
                  "Rank need is not importance: the energy share says how much of the update each carries.</p>",
                  table(head, ([m.name, num(m.r), num(m.energy_rank_90), num(m.stable_rank), pct(m.utilization),
                                share_bar(m.name)]
                               + ([g(m.rel_frobenius)] if has_base else []) for m in hungry))]  # fmt: skip
    if a.least_rank_used:
        parts += [f"<h3>Lowest utilization ({len(a.least_rank_used)} least rank-used modules)</h3>",
                  table(["module", "r", "utilization", "k@90%", "energy share"],
                        ([m.name, num(m.r), pct(m.utilization), num(m.energy_rank_90), share_bar(m.name)]
                         for m in a.least_rank_used))]  # fmt: skip
    layers = a.gain.layers
    if layers:
        top = max(x.share for x in layers) or 1.0
        parts += ["<h3>Update energy per layer</h3>",
                  table(["layer", "share of Σ|dW|_F²"], ([str(x.layer), bar(x.share / top, pct(x.share))]
                                                          for x in layers))]  # fmt: skip
    sug = a.suggestion
    if sug is None:  # an all-zero adapter: nothing to suggest from
        parts += ["<h3>Suggested ranks</h3>", '<p class="note">None: every module\'s update is zero.</p>']
    else:
        parts += ["<h3>Suggested ranks</h3>", kv([
            (f"Uniform, typical (p50 of k@{sug.energy_fraction:.0%})", num(sug.uniform_median)),
            ("Uniform, conservative (p90)", num(sug.uniform_p90) + (" (= allocated rank: the data cannot "
                                                                     "say whether more would help)" if sug.at_allocated_rank else "")),
            ("Per module (rank_pattern)", _pattern_summary(sug.rank_pattern)),
        ]), f'<p class="note">{esc(sug.note)}</p>']  # fmt: skip
    if a.warnings:
        parts.append(ul(a.warnings, "warn"))
    return "\n".join(parts)


def _pattern_summary(pattern: dict[str, int]) -> str:
    if not pattern:
        return "n/a"
    counts: dict[int, int] = {}
    for r in pattern.values():
        counts[r] = counts.get(r, 0) + 1
    return ", ".join(f"r={r}: {n} module{'' if n == 1 else 's'}" for r, n in sorted(counts.items()))


def check_section(c: CheckReport) -> str:
    """Pre-flight findings of the adapter's config and training arguments."""
    counts = {sev: c.count(sev) for sev in ("error", "warning", "info")}
    verdict = "no errors" if counts["error"] == 0 else f"{counts['error']} error(s)"
    cls = "ok" if counts["error"] == 0 else "warn"
    rows = ([f.severity, f.rule, f.message, "" if f.suggested is None else f"{f.field or ''} = {f.suggested}"]
            for f in c.findings)  # fmt: skip
    parts = [f"<h2>Pre-flight check (profile {esc(c.profile)})</h2>",
             f'<p class="{cls}">{esc(verdict)}; {counts["warning"]} warning(s), {counts["info"]} note(s)</p>',
             table(["severity", "rule", "finding", "suggested"], rows) if c.findings else ""]  # fmt: skip
    if c.skipped:
        parts.append(ul([f"skipped: {x}" for x in c.skipped], "note"))
    return "\n".join(p for p in parts if p)


def trigger_section(t: TriggerSummary) -> str:
    """Each trigger (step, reason, detail) and the evals and seconds saved."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(t.by_reason.items(), key=lambda kv: -kv[1]))
    rows: list[list[Any]] = [[str(e.step), e.reason + (f" (+{', '.join(e.also)})" if e.also else ""), e.detail,
                              "" if e.detected_step in (None, e.step) else str(e.detected_step)]
                             for e in t.triggers]  # fmt: skip
    return "\n".join([
        f"<h2>Trigger evals: {t.n_triggers}</h2>", kv([
            ("Savings", savings_line(t)), ("By reason", reasons or "none"),
            ("Eval time", f"{g(t.eval_seconds)} s over {num(t.evals_run)} evals"),
        ]), table(["step", "reason", "detail", "detected at"], rows) if rows else "",
    ])  # fmt: skip
