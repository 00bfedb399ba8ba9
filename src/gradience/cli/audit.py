"""`gradience audit`: spectral audit of a saved PEFT LoRA adapter."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import AdapterInput, adapter_arg, add_adapter_argument, resolve_adapter
from gradience.cli._output import emit_json, header, human_count, num, pct
from gradience.mechanic.audit import AuditReport, audit


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit", help="spectral audit of a saved LoRA adapter (PEFT folder or kohya/diffusers file)",
        description="Audit a PEFT adapter folder or one single-file LoRA (a .safetensors file: "
        "kohya-ss / diffusers `lora_down` / `lora_up` / `alpha` keys, scale = alpha / r, alpha = r "
        "when absent): per-module spectra, the most rank-hungry modules, suggested ranks.",
    )
    add_adapter_argument(p, "PEFT adapter folder, or a single-file LoRA (.safetensors)")
    p.add_argument("--adapter-config", help="use this adapter_config.json instead of the one in --peft-dir")
    p.add_argument(
        "--weights", metavar="FILE",
        help="weights file to use instead of the one in --peft-dir; alone, a single-file (kohya/diffusers) LoRA",
    )
    p.add_argument(
        "--format", choices=("auto", "peft", "kohya"), default="auto",
        help="key grammar of --weights FILE (auto: kohya unless an adapter_config.json sits beside it)",
    )
    p.add_argument(
        "--base-model", metavar="DIR",
        help="base model's safetensors shards: adds |dW|_2/|W|_2 and |dW|_F/|W|_F per module",
    )
    p.add_argument(
        "--base-cache", metavar="FILE",
        help="cache file for the base weights' norms (default: $GRADIENCE_CACHE_DIR, "
        "$XDG_CACHE_HOME/gradience or ~/.cache/gradience, under base_norms/)",
    )
    p.add_argument("--top-least-used", "--top-wasteful", dest="top_least_used", type=int, default=10, metavar="N",
                   help="list the N least rank-used modules (lowest utilization); --top-wasteful is its old name")
    p.add_argument("--layers", action="store_true", help="show (and put in --json) every module's metrics")
    p.add_argument("--energy", type=float, default=0.9, help="energy fraction for k@q and suggestions (default 0.9)")
    p.add_argument("--json", action="store_true", help="print the AuditReport as JSON")
    p.add_argument("--append", metavar="RUN_JSONL", help="add the audit as a metrics event to this run log")
    p.add_argument("--recursive", metavar="DIR",
                   help="audit every folder with an adapter_config.json under DIR: one JSON line each on stdout")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes for --recursive (default: min(CPU count, 4))")  # fmt: skip
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run --recursive on this Dask scheduler's workers (pip install gradience[dask])")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.recursive:
        return run_recursive(args)
    if args.weights and not (args.adapter or args.adapter_alias):
        source = AdapterInput(None, None)  # --weights FILE alone: single-file mode, as before
    else:
        source = resolve_adapter(adapter_arg(args))
    report = audit(
        source.peft_dir, adapter_config=args.adapter_config, weights=args.weights or source.weights,
        energy=args.energy, top_least_used=args.top_least_used,
        fmt=args.format, base_model=args.base_model, base_cache=args.base_cache,
    )
    if args.append:
        append_to_log(report, args.append)
    if args.json:
        emit_json(report.to_dict(include_modules=args.layers))
    else:
        print("\n".join(render(report, layers=args.layers)))
    return 1 if report.problems else 0  # an unreadable module fails the run; the report still prints


def run_recursive(args: argparse.Namespace) -> int:
    """One JSON line per adapter on stdout, `[k/n] path` progress on stderr; 1 if any failed."""
    import json
    import sys

    from gradience.mechanic.audit_many import AdapterResult, audit_many

    def progress(k: int, n: int, result: AdapterResult) -> None:
        print(f"[{k}/{n}] {result.path}{'' if result.ok else ' FAILED'}", file=sys.stderr, flush=True)

    failed = 0
    for result in audit_many(args.recursive, workers=args.workers, scheduler=args.scheduler, on_result=progress,
                             energy=args.energy, top_least_used=args.top_least_used):  # fmt: skip
        try:
            line = json.dumps(result.to_dict(include_modules=args.layers), allow_nan=False)
        except ValueError as exc:  # a non-finite number in the report: still one line, marked failed
            result = AdapterResult(result.path, False, error=f"report is not JSON-safe ({exc})")
            line = json.dumps(result.to_dict())
        failed += not result.ok or bool(result.report is not None and result.report.problems)
        print(line, flush=True)
    return 1 if failed else 0


def append_to_log(report: AuditReport, log_path: str) -> None:
    """One `metrics` record of kind `lora_audit`, added without touching existing lines."""
    from gradience.telemetry import append_record_atomic

    s, g = report.summary, report.suggestion
    suggestion: dict[str, object] = {"energy_fraction": report.energy_fraction}
    if g is not None:
        suggestion.update(uniform_median=g.uniform_median, uniform_p90=g.uniform_p90)
    append_record_atomic(
        log_path, "metrics", kind="lora_audit", peft_dir=report.peft_dir,
        metrics={
            "lora_params": s.lora_params, "n_modules": s.n_modules, "n_layers": s.n_layers, "n_zero": s.n_zero,
            "stable_rank_mean": s.stable_rank_mean, "utilization_mean": s.utilization_mean,
            "energy_rank_p50": s.energy_rank_p50, "energy_rank_p90": s.energy_rank_p90, **s.other_energy,
            "frobenius_norm": s.frobenius_norm_total, "sigma_max": s.sigma_max_max,
        },
        suggestion=suggestion,
    )


def render(report: AuditReport, layers: bool = False) -> list[str]:
    s, g = report.summary, report.suggestion
    q = f"{round(100 * report.energy_fraction):d}%"
    out = header("GRADIENCE LoRA AUDIT")
    if report.format == "kohya":
        out += [f"Weights: {report.weights_path}", "Format: kohya/diffusers single file (scale = alpha / r)"]
    else:
        out += [f"PEFT dir: {report.peft_dir}", f"Config: {report.config_path}", f"Weights: {report.weights_path}"]
    out += [
        f"LoRA: r={report.r} alpha={num(report.lora_alpha)} rsLoRA={'yes' if report.use_rslora else 'no'}"
        f" DoRA={'yes' if report.use_dora else 'no'}",
        "",
        "Summary:",
        f"  LoRA params: {human_count(s.lora_params)}",
        f"  Modules: {s.n_modules}  Layers: {s.n_layers}"
        + (f"  Zero updates (left out of every aggregate): {s.n_zero}" if s.n_zero else ""),
        f"  Stable rank (mean): {s.stable_rank_mean:.2f}",
        f"  Utilization (mean): {pct(s.utilization_mean)}",
        f"  Energy rank k@90% (p50/p90): {num(s.energy_rank_p50, 1)}/{num(s.energy_rank_p90, 1)}",
    ]
    for key, value in s.other_energy.items():
        out.append(f"  {key}: {num(value, 1)}")
    if report.least_rank_used:
        out += ["", f"Least rank-used modules (lowest utilization = stable rank / r: most of the allocated rank "
                    f"unused, candidates for a smaller r; top {len(report.least_rank_used)}):"]
        for i, m in enumerate(report.least_rank_used, 1):
            rel = f" |dW|/|W|={_g(m.rel_spectral)}" if report.base_relative else ""
            out.append(
                f"  {i:02d}. {m.type:<5} r={m.r:<3} util={pct(m.utilization):>6} energy={pct(m.energy_share):>6}"
                f"{rel} sr={num(m.stable_rank)} k@{q}={m.energy_rank}  {m.name}"
            )
    out += ["", "By module type:"]
    for t in report.by_type:
        out.append(
            f"  {t.type:<5} modules={t.n_modules:<4} params={human_count(t.params):<7}"
            f" sr={t.stable_rank_mean:.2f} util={pct(t.utilization_mean)}"
            f" k@{q} p50/p90={num(t.energy_rank_p50, 1)}/{num(t.energy_rank_p90, 1)}"
        )
    out += _render_gain(report)
    out += _render_base(report)
    if g is None:
        out += ["", "Suggested ranks: none (no module has a nonzero update)"]
        return out + _render_tail(report, layers)
    out += [
        "",
        f"Suggested ranks (energy {q}, rounded up on grid {','.join(map(str, g.grid))}):",
        f"  uniform, typical (p50 of k@{q}):      r={g.uniform_median}",
        f"  uniform, conservative (p90 of k@{q}): r={g.uniform_p90}",
        f"  per-module rank_pattern: {len(g.rank_pattern)} modules (full map in --json)",
    ]
    if g.at_allocated_rank:
        out.append("  The conservative suggestion is the allocated rank: this adapter may use all of it.")
    out.append(f"  {g.note}")
    return out + _render_tail(report, layers)


def _render_tail(report: AuditReport, layers: bool) -> list[str]:
    out: list[str] = []
    if layers:
        out += ["", "Modules:"]
        for m in report.modules:
            out.append(
                f"  {m.name}  {m.type} {m.kind} {m.shape[0]}x{m.shape[1]} r={m.r} status={m.status}"
                f" |dW|_F={num(m.frobenius_norm, 4)} sigma_max={num(m.sigma_max, 4)}"
                f" sr={num(m.stable_rank)} util={pct(m.utilization)} energy={pct(m.energy_share)}"
                f" k@90%={m.energy_rank_90}"
                + (f" rel2={_g(m.rel_spectral)} relF={_g(m.rel_frobenius)}" if report.base_relative else "")
            )
    if report.warnings:
        out += ["", "Warnings:"] + [f"  - {w}" for w in report.warnings]
    if report.problems:
        out += ["", "Problems:"] + [f"  - {p['module']}: {p['problem']}" for p in report.problems]
    return out


def _render_gain(report: AuditReport) -> list[str]:
    gain = report.gain
    if not gain.layers:
        return []
    out = ["", f"Update energy by layer (concentration {gain.concentration:.2f}; 0 = even, 1 = one layer):"]
    peak = max(lg.share for lg in gain.layers) or 1.0
    for lg in gain.layers:
        bar = "#" * max(0, round(24 * lg.share / peak))
        out.append(f"  layer {lg.layer:>3} {pct(lg.share):>6} {bar}")
    return out


def _render_base(report: AuditReport) -> list[str]:
    b = report.base_relative
    if b is None:
        return []
    out = [
        "", f"Update size relative to the base weight ({b.n_matched} modules matched in {b.base_model}):",
        f"  |dW|_2/|W|_2 median {_g(b.rel_spectral_median)} max {_g(b.rel_spectral_max)}",
        f"  |dW|_F/|W|_F median {_g(b.rel_frobenius_median)} max {_g(b.rel_frobenius_max)}",
    ]
    if b.largest:
        out.append("  largest |dW|_2/|W|_2:")
        out += [f"    {_g(m['rel_spectral']):>9}  {m['name']}" for m in b.largest]
    if b.unmatched:
        out.append(f"  {b.n_unmatched} module(s) without a base weight, e.g. {b.unmatched[0]['module']}: "
                   f"{b.unmatched[0]['reason']}")
    return out


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
