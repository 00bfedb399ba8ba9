"""`gradience check`: pre-flight validation of a LoRA config and training arguments."""

from __future__ import annotations

import argparse
from typing import Any

from gradience.cli._inputs import adapter_arg, add_adapter_argument, resolve_adapter
from gradience.cli._output import emit_json, header
from gradience.errors import UsageError
from gradience.preflight.check import SEVERITIES, CheckReport, Finding, check, format_number
from gradience.preflight.profiles import PROFILES

_TITLES = {"error": "Errors", "warning": "Warnings", "info": "Info"}


def register(sub: Any) -> None:
    profiles = ", ".join(PROFILES)
    p = sub.add_parser(
        "check", help="validate a LoRA config and training arguments before training",
        description="Check adapter_config.json and training_args.json (or a TRL / axolotl training config) "
                    f"against a task profile ({profiles}). Exit 0: no errors (warnings are advice); 1: errors; "
                    "2: bad usage.",
    )
    p.add_argument("--task", required=True,
                   help=f"task profile or alias: {profiles}, or e.g. sst2, imdb, gsm8k, chat, code")
    add_adapter_argument(p, "adapter folder with adapter_config.json (or the file itself); optional with --config")
    p.add_argument("--training-dir",
                   help="folder with training_args.json (or the file); the Gradience callback's out_dir has one")
    p.add_argument("--config", metavar="TRAIN_YAML",
                   help="a TRL / axolotl training config (YAML or JSON): check before any training")
    p.add_argument("--model-config", metavar="CONFIG_JSON",
                   help="the model's config.json (default: one in --training-dir or --peft-dir)")
    p.add_argument("--json", action="store_true", help="print the CheckReport as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = args.adapter or args.adapter_alias
    if given is None and args.config is None:
        raise UsageError("pass an adapter folder (e.g. runs/toy/peft) or --config (a training config)")
    peft_dir = None
    if given is not None:
        source = resolve_adapter(adapter_arg(args))
        peft_dir = source.peft_dir or str(source.weights)
    report = check(args.task, peft_dir, training_dir=args.training_dir, model_config=args.model_config,
                   config=args.config)
    if args.json:
        emit_json(report)
    else:
        print("\n".join(render(report)))
    return 0 if report.ok else 1


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _value(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return format_number(x)
    if isinstance(x, (list, tuple)):
        return ", ".join(map(str, x))
    return str(x)


def _finding(f: Finding) -> list[str]:
    lines = [f"  [{f.rule}] {f.message}", f"      why: {f.rationale}"]
    if f.suggested is not None:
        lines.append(f"      suggested: {f.field} = {_value(f.suggested)}" if f.field else f"      suggested: {_value(f.suggested)}")
    return lines


def render(report: CheckReport) -> list[str]:
    t = report.training
    kind = "alpha/sqrt(r)" if report.use_rslora else "alpha/r"
    model = f"{report.model_config} (model_type {report.model_type})" if report.model_config else "none found"
    out = header("GRADIENCE CHECK")
    out += [
        f"Task: {report.task} (profile: {report.profile})",
        f"Adapter config: {report.adapter_config}",
        f"Training args: {t.path if t else 'none'}",
        f"Model config: {model}",
        f"LoRA: r={report.r} alpha={_value(report.lora_alpha)} scale {kind}={_value(report.scale)}"
        f" dropout={_value(report.lora_dropout)} rsLoRA={'yes' if report.use_rslora else 'no'} DoRA={'yes' if report.use_dora else 'no'}",
        f"Targets: {_value(report.target_modules) if report.target_modules else 'none'}",
    ]
    if t is not None:
        out.append(
            f"Training: lr={_value(t.learning_rate)} effective batch={_value(t.effective_batch_size)}"
            f" epochs={_value(t.num_train_epochs)} max_steps={_value(t.max_steps)} total steps={_value(t.total_steps)}"
        )
    for severity in SEVERITIES:
        group = [f for f in report.findings if f.severity == severity]
        if group:
            out += ["", f"{_TITLES[severity]} ({len(group)}):"]
            for f in group:
                out += _finding(f)
    if report.skipped:
        out += ["", "Skipped:"] + [f"  - {s}" for s in report.skipped]
    n_err, n_warn = report.count("error"), report.count("warning")
    if n_err:
        advice = "fix the errors before training"
    else:
        advice = "review the warnings before training" if n_warn else "nothing to flag"
    out += ["", f"Verdict: {_plural(n_err, 'error')}, {_plural(n_warn, 'warning')} ({advice})", report.note]
    return out
